"""main.py under torch.distributed.run with one injected fault: on the first attempt, rank 1 is killed
(SIGKILL) right after its second optimizer step; torchrun --max-restarts then starts both ranks again with
the same command line.

A watchdog ends a worker that has not finished within WATCHDOG_S, with every thread's traceback on stderr,
so that a hang fails the test with the place it hung instead of blocking the suite.
"""
import faulthandler
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import main  # noqa: E402

WATCHDOG_S = 300

if os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0' and os.environ.get('RANK') == '1':
    after_step = checkpoint.Checkpointer.after_step

    def killed_after_the_second_step(self, epoch, steps_done, *args, **kwargs):
        after_step(self, epoch, steps_done, *args, **kwargs)
        if (epoch, steps_done) == (0, 2):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.after_step = killed_after_the_second_step

if __name__ == '__main__':
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    sys.exit(main.cli())
