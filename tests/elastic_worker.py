"""main.py under torch.distributed.run with one injected fault: on the first attempt, rank 1 exits
(code 3) right after its second optimizer step, as a crashing worker does; torchrun --max-restarts
then starts both ranks again with the same command line.

A crash, not SIGKILL: after a rank is SIGKILLed, gloo's restarted group here connects to the dead
rank's old address and never forms (a bare init_process_group script without any deit code shows
the same), so a killed rank cannot show the restart on this CPU-only machine.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import main  # noqa: E402

if os.environ.get('TORCHELASTIC_RESTART_COUNT') == '0' and os.environ.get('RANK') == '1':
    after_step = checkpoint.Checkpointer.after_step

    def crash_after_the_second_step(self, epoch, steps_done, *args, **kwargs):
        after_step(self, epoch, steps_done, *args, **kwargs)
        if (epoch, steps_done) == (0, 2):
            os._exit(3)

    checkpoint.Checkpointer.after_step = crash_after_the_second_step

if __name__ == '__main__':
    sys.exit(main.cli())
