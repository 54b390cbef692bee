"""Launched by torchrun (tests/test_rank_failures.py): main.py's command line with a fault injected on one
rank; each rank then writes its exit code, when it exited and when it first printed an error line.

Usage: rank_faults.py OUT_DIR FAULT [main.py flags]; writes OUT_DIR/exit_rank{RANK}.json. Faults:
``none``; ``full-disk`` (on rank 0, every write of checkpoint.pth after the first fails with ENOSPC);
``node-local-output-dir`` (rank 1 gets an --output_dir of its own, as a node-local path gives a rank
on another node).
"""
import errno
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

RANK = int(os.environ['RANK'])
first_error = []


def full_disk_after_the_first_checkpoint() -> None:
    save_atomic = checkpoint.save_atomic

    def save(obj, path):
        if os.path.basename(path) == 'checkpoint.pth' and os.path.exists(path):
            def no_space(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return utils.write_atomic(path, no_space)
        return save_atomic(obj, path)

    checkpoint.save_atomic = save


class ErrorClock:
    """stderr, noting when a first 'error:' line was written to it."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        if 'error:' in text and not first_error:
            first_error.append(time.time())
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == '__main__':
    out, fault, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if fault == 'full-disk' and RANK == 0:
        full_disk_after_the_first_checkpoint()
    if fault == 'node-local-output-dir' and RANK == 1:
        argv[argv.index('--output_dir') + 1] += '-node1'
    sys.stderr = ErrorClock(sys.stderr)
    code = main.cli(argv)
    (out / f'exit_rank{RANK}.json').write_text(json.dumps({'code': code, 'exited': time.time(),
                                                           'first_error': first_error[0] if first_error else None}))
    sys.exit(code)
