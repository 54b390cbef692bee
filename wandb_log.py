"""--wandb PROJECT: the epoch records of log.txt and the run's resolved arguments, logged to Weights & Biases.

An optional extra: only --wandb imports the package, and without it the run is refused in one line. The W&B
run id is kept in ``output_dir/wandb_run_id.txt`` (and in the run's args, so every checkpoint names it): a
resumed run continues the same W&B run. W&B's own settings apply (``WANDB_MODE=offline`` logs to
``output_dir/wandb`` without network, for ``wandb sync`` later).
"""
import os
import uuid
from pathlib import Path
from typing import Optional

from utils import UserError, first_line, is_main_process

RUN_ID_FILE = 'wandb_run_id.txt'


def check_available() -> None:
    """Refuse --wandb, before anything is built, where the package is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError('--wandb needs the wandb package: python -m pip install -r requirements.txt '
                        '-c constraints.txt (or drop --wandb)') from None


def run_id(output_dir: str, resuming: bool) -> str:
    """The W&B run id of this run: the one ``output_dir`` recorded when resuming, else a new one (recorded)."""
    path = Path(output_dir) / RUN_ID_FILE if output_dir else None
    if resuming and path and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    new = uuid.uuid4().hex[:8]  # W&B's own id form: 8 lower-case letters and digits
    if path:
        path.write_text(new + '\n')
    return new


class WandbLog:
    """One W&B run (on the main process only): ``log`` an epoch record, ``finish`` at the end."""

    def __init__(self, project: str, run_id: str, config: dict, output_dir: str):
        self.run = None
        if not is_main_process():
            return
        import wandb
        try:
            self.run = wandb.init(project=project, id=run_id, resume='allow', config=config,
                                  dir=output_dir or None, name=os.path.basename(os.path.normpath(output_dir)) or None)
        except Exception as e:  # not logged in, no network in online mode, a bad project name
            raise UserError(f'--wandb {project}: W&B could not start ({first_line(e)}): run `wandb login`, or set '
                            f'WANDB_MODE=offline and `wandb sync` later') from None
        # epochs, not W&B's own step counter, on the x axis: a resumed run that trains an epoch again
        # logs it again instead of being refused for going back in steps
        self.run.define_metric('epoch')
        self.run.define_metric('*', step_metric='epoch')

    def log(self, stats: dict) -> None:
        if self.run is not None:
            self.run.log(stats)

    def finish(self, exit_code: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
