"""Never lose a run: step checkpoints inside an epoch, --resume auto, and preemption signals.

Low-level file I/O (atomic writes, safe loading) lives in utils.py; this module decides *when* to
save, *which* checkpoint to resume from, and how a SIGTERM becomes a clean stop.
"""
import collections
import fcntl
import glob
import os
import re
import signal
import socket
import sys
import time
import zipfile
from typing import IO, Callable, List, Optional, Tuple

import torch

import utils

STEP_CHECKPOINT = re.compile(r'checkpoint-e(\d+)-s(\d+)\.pth$')


class TrainingInterrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it."""

    def __init__(self, signum: int, where: str, path: Optional[str], saved: str = ''):
        self.signum, self.path = signum, path
        if not saved:
            saved = f'saved checkpoint {path}' if path else 'saved no checkpoint (no --output_dir)'
        super().__init__(f'stopped by {signal.Signals(signum).name} {where}; {saved}; continue with --resume auto')


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ---------------------------------------------------------------------------------------------

def is_readable_checkpoint(path: str) -> bool:
    """A complete torch zip archive: a truncated or corrupted file fails the CRC check."""
    return zipfile.is_zipfile(path) and not utils.checkpoint_damage(path)


def candidate_checkpoints(output_dir: str) -> List[str]:
    """checkpoint.pth and the step checkpoints of a run (best_checkpoint.pth is not a resume point)."""
    paths = glob.glob(os.path.join(output_dir, 'checkpoint-e*-s*.pth'))
    return paths + [p for p in [os.path.join(output_dir, 'checkpoint.pth')] if os.path.isfile(p)]


def training_position(path: str) -> Optional[Tuple[int, int]]:
    """(epoch, steps done in it) that a readable checkpoint continues from, read from its contents.

    File names and modification times are not trusted: a copy (cp -r, rsync without -t) changes
    the times, and a renamed file its name. An epoch-end checkpoint continues at (epoch + 1, 0).
    """
    try:  # mmap: the tensors are not read, only the small pickled structure
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        epoch, step = int(ckpt['epoch']), ckpt.get('step')
    except Exception:  # not a checkpoint of ours (no epoch): not a resume point
        return None
    return (epoch + 1, 0) if step is None else (epoch, int(step))


def find_newest_checkpoint(output_dir: str) -> str:
    """For --resume auto: the readable checkpoint furthest into training, or '' (start fresh) when there is none.

    On a tie checkpoint.pth wins (it also holds the epoch's evaluation).
    """
    found = []
    for path in candidate_checkpoints(output_dir):
        position = training_position(path) if is_readable_checkpoint(path) else None
        if position is None:
            print(f'warning: --resume auto: skipping unreadable checkpoint {path}')
        else:
            found.append((position, os.path.basename(path) == 'checkpoint.pth', path))
    if not found:
        print(f'--resume auto: no checkpoint in {output_dir}, starting fresh')
        return ''
    (epoch, step), _, path = max(found)
    print(f'--resume auto: resuming from {path} (epoch {epoch}, {step} steps done)')
    return path


def agreed_resume_checkpoint(output_dir: str) -> str:
    """find_newest_checkpoint on rank 0 only (it reads every candidate), its choice sent to every rank."""
    choice = [find_newest_checkpoint(output_dir) if utils.is_main_process() else None]
    if utils.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


def elastic_restarts() -> int:
    """How many times torchrun (--max-restarts) has restarted this job's workers."""
    return int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))


def resume_source(resume: str, output_dir: str) -> str:
    """The checkpoint to resume from: --resume, with 'auto' resolved; after a torchrun restart, the newest
    checkpoint of the run in output_dir (the restarted command line still names where it *started*)."""
    restarts = elastic_restarts()
    if resume != 'auto' and not (restarts and output_dir):
        return resume
    found = agreed_resume_checkpoint(output_dir)
    if resume != 'auto' and found:
        print(f'torchrun restart {restarts}: continuing the run from {found}, not from --resume {resume or "(none)"}')
    return found or ('' if resume == 'auto' else resume)


def remove_stale_temporaries(output_dir: str) -> None:
    """Temporary files of writes that a kill interrupted: never valid, safe to delete by the directory's owner."""
    for path in glob.glob(os.path.join(output_dir, '.*.tmp*')):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# Ownership of an output directory
# ---------------------------------------------------------------------------------------------

LOCK_FILE = '.lock'


def claim_output_dir(output_dir: str) -> Optional[IO[str]]:
    """Make this process the only writer of ``output_dir`` until the returned file is closed (at exit).

    An exclusive flock on ``output_dir/.lock``: the OS releases it whatever ends the process, so a
    killed run never leaves a stale lock. Only rank 0 writes, so only rank 0 claims. The lock file
    names its holder for the refusal message. On a filesystem without locks (some NFS or Lustre
    mounts) the run goes on unprotected, with a warning.
    """
    if not utils.is_main_process():
        return None
    lock = open(os.path.join(output_dir, LOCK_FILE), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        lock.close()
        raise utils.UserError(f'--output_dir {output_dir} is in use by {holder}: wait for that run to end, '
                              f'or choose another --output_dir') from None
    except OSError as e:
        print(f'warning: cannot lock --output_dir {output_dir} ({e.strerror}): make sure no other run uses it')
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {socket.gethostname()} (since {time.strftime("%Y-%m-%d %H:%M:%S")})\n')
    lock.flush()
    remove_stale_temporaries(output_dir)
    return lock


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------

# The signals that ask a run to stop; workers ignore them all (ignore_stop_signals).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """Turn stop signals into a request to stop after the current training step.

    Outside Slurm: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1. Under submitit, whose SIGUSR2 handler
    checkpoints and requeues the job, SIGUSR2 is taken over and submitit's handler is called once
    our checkpoint is written (``hand_over``); SIGTERM stays with submitit, which expects USR2 to
    follow it. Until ``training()`` there is nothing to save, so a signal stops at once; so does a
    second signal during training (the checkpoint of the first one was not written yet).
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self.submitit_handler = None
        self.where = 'before training started'

    def install(self) -> None:
        usr2 = signal.getsignal(signal.SIGUSR2)
        if callable(usr2):  # under submitit
            self.submitit_handler = usr2
        for signum in ((signal.SIGUSR2, signal.SIGINT) if self.submitit_handler else
                       (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
            signal.signal(signum, self._record)

    def training(self) -> None:
        """From now on a (first) signal stops after the current step, which is then saved."""
        self.where = ''

    def _record(self, signum, frame) -> None:
        if self.where and not (self.submitit_handler and signum == signal.SIGUSR2):
            # Nothing is saved yet, and an exception raised here could land anywhere (inside an import,
            # under a library's except clause) and leave a half-initialised module behind: exit at once.
            print(f'stopped by {signal.Signals(signum).name} {self.where}; nothing to save yet', file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if self.where:  # under submitit: its USR2 handler requeues the job once main() has unwound
            raise TrainingInterrupted(signum, self.where, None, 'nothing to save yet')
        if self.signum is not None:
            raise TrainingInterrupted(signum, 'a second time, at once', None,
                                      'the last checkpoint written is kept')
        print(f'Received {signal.Signals(signum).name}: stopping after the current step '
              f'(send it again to stop at once)', flush=True)
        self.signum = signum

    def hand_over(self, signum: int) -> None:
        """Under submitit, let its SIGUSR2 handler (checkpoint and requeue) act on that signal."""
        if signum == signal.SIGUSR2 and self.submitit_handler:
            self.submitit_handler(signum, None)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a signal sent to the whole process group (Slurm, systemd, Ctrl-C)
    must reach only the trainer, which saves and then ends its workers itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Step checkpoints
# ---------------------------------------------------------------------------------------------

class RankAgreement:
    """Every rank learns the same requests (stop signal, time-based save) after the same step, every step,
    without waiting on the device: each step's all-reduce is read ``LAG`` steps later, long complete by then.

    On CUDA the flags travel through pinned host memory with non-blocking copies, and the read waits
    only for the event recorded after that old all-reduce, not for the steps queued since.
    """
    LAG = 2

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = collections.deque()

    def exchange(self, flags: List[int]) -> Optional[List[int]]:
        """Start the all-reduce (max) of this step's ``flags``; the result of the one ``LAG`` steps ago, or None."""
        values = torch.tensor(flags, dtype=torch.int64)
        cuda = self.device.type == 'cuda'
        if cuda:
            values = values.pin_memory().to(self.device, non_blocking=True)
        work = torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, async_op=True)
        event = None
        if cuda:
            work.wait()  # orders the copy below after the all-reduce on the device; the host does not wait
            values = values.to('cpu', non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((work, values, event))
        return self.read_oldest() if len(self.pending) > self.LAG else None

    def read_oldest(self) -> List[int]:
        work, values, event = self.pending.popleft()
        event.synchronize() if event is not None else work.wait()
        return values.tolist()

    def drain(self) -> List[int]:
        """The maximum of every exchange still in flight (all ranks call it at the same point)."""
        result = [0, 0]
        while self.pending:
            result = [max(a, b) for a, b in zip(result, self.read_oldest())]
        return result


class Checkpointer:
    """Decides after each training step whether to write a step checkpoint or to stop.

    ``payload(epoch, steps_done, metrics)`` builds the checkpoint dict; only rank 0 builds and
    writes it. Distributed ranks exchange their requests every step (RankAgreement), so that all of
    them stop, or save, after the same step, a couple of steps after the request.
    """

    def __init__(self, output_dir: str, payload: Callable[[int, int, dict], dict], every_steps: int = 0,
                 every_minutes: float = 0, keep_last: int = 2, signals: Optional[StopSignals] = None,
                 device: torch.device = torch.device('cpu')):
        self.output_dir = output_dir
        self.payload = payload
        self.every_steps = every_steps
        self.every_seconds = every_minutes * 60
        self.keep_last = keep_last
        self.signals = signals or StopSignals()
        self.agreement = RankAgreement(device) if utils.get_world_size() > 1 else None
        self.last_save = time.time()

    def _requests(self) -> Tuple[Optional[int], bool]:
        """(stop signal, time-based save due), the same on every rank."""
        overdue = bool(self.every_seconds) and time.time() - self.last_save >= self.every_seconds
        if self.agreement is None:
            return self.signals.signum, overdue
        agreed = self.agreement.exchange([self.signals.signum or 0, int(overdue)])
        if agreed is None:
            return None, False
        return agreed[0] or None, bool(agreed[1])

    def after_step(self, epoch: int, steps_done: int, metrics: Callable[[], dict],
                   before_save: Callable[[], None] = lambda: None) -> None:
        """Called with the number of finished steps of the epoch; raises TrainingInterrupted to stop.

        ``metrics()`` gives the epoch's running averages and ``before_save()`` raises if the state must
        not be saved (a non-finite loss; a collective, called on every rank); both are called only
        when a checkpoint is written, since reading device values back waits for the device.
        """
        signum, overdue = self._requests()
        due = (self.every_steps and steps_done % self.every_steps == 0) or overdue
        path = None
        if self.output_dir and (due or signum):
            before_save()
            path = self.save(epoch, steps_done, metrics())
        if signum:
            raise TrainingInterrupted(signum, f'after step {steps_done} of epoch {epoch}', path)

    def after_epoch(self, epoch: int, path: Optional[str]) -> None:
        """Called once the epoch's checkpoint.pth is written: its step checkpoints are obsolete (removed);
        stop here if a signal came during the last steps or the evaluation."""
        if self.output_dir and utils.is_main_process():
            self.prune(finished_epoch=epoch)
        signum = self.signals.signum
        if self.agreement is not None:  # every exchange in flight, and one more now (a wait, once an epoch)
            latest = self.agreement.exchange([signum or 0, 0]) or [0]
            signum = max(latest[0], self.agreement.drain()[0]) or None
        if signum:
            raise TrainingInterrupted(signum, f'at the end of epoch {epoch}', path)

    def save(self, epoch: int, steps_done: int, metrics: dict) -> str:
        path = os.path.join(self.output_dir, f'checkpoint-e{epoch:04d}-s{steps_done:06d}.pth')
        if utils.is_main_process():
            utils.save_atomic(self.payload(epoch, steps_done, metrics), path)
            self.prune()
        self.last_save = time.time()
        return path

    def prune(self, finished_epoch: int = -1) -> None:
        """Keep the ``keep_last`` newest step checkpoints, none of an epoch up to ``finished_epoch``
        (checkpoint.pth and best_* are separate)."""
        steps = []
        for path in glob.glob(os.path.join(self.output_dir, 'checkpoint-e*-s*.pth')):
            match = STEP_CHECKPOINT.search(path)
            if match:
                steps.append(((int(match.group(1)), int(match.group(2))), path))
        for newer, ((epoch, _), path) in enumerate(sorted(steps, reverse=True)):
            if newer >= self.keep_last or epoch <= finished_epoch:
                os.remove(path)
