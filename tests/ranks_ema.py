"""Launched by torchrun (tests/test_ranks.py): main.py's command line, then each rank saves its EMA.

Usage: ranks_ema.py OUT_DIR [main.py flags]; writes OUT_DIR/ema_rank{RANK}.pth.
"""
import os
import sys
from pathlib import Path

import torch
from timm.utils import ModelEmaV3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import main  # noqa: E402

created = []


class RecordedEma(ModelEmaV3):
    """timm's EMA, remembered so that its weights can be saved once the run ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        created.append(self)


if __name__ == '__main__':
    main.ModelEmaV3 = RecordedEma
    code = main.cli(sys.argv[2:])
    torch.save(created[0].module.state_dict(), Path(sys.argv[1]) / f'ema_rank{os.environ["RANK"]}.pth')
    sys.exit(code)
