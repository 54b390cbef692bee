"""main.py whose image reads hang, as on a hung network file system, once the file $STUCK_MARKER exists
(tests/test_probe.py sends it a stop signal then). The data deadline is shortened to keep the test short."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import data_files  # noqa: E402
import fast_data  # noqa: E402
import main  # noqa: E402

checkpoint.DATA_WAIT_SECONDS = 1.0
open_regular_file = data_files.open_regular_file


def hanging_open(path):
    if os.path.exists(os.environ['STUCK_MARKER']):
        time.sleep(3600)
    return open_regular_file(path)


data_files.open_regular_file = fast_data.open_regular_file = hanging_open
sys.exit(main.cli())
