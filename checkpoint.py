"""Never lose a run: what a checkpoint holds and how it is restored (TrainingState), step checkpoints
inside an epoch, --resume auto, and preemption signals.

This module decides *what* is saved, *when*, *which* checkpoint to resume from, and how a SIGTERM
becomes a clean stop; reading checkpoint files and fitting their weights to a model is weights.py's.
"""
import collections
import fcntl
import glob
import multiprocessing
import os
import re
import signal
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import IO, Callable, Dict, List, Optional, Tuple

import torch
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

import seeding
import utils
import weights
from engine import DataWaitExpired, LossScaler

STEP_CHECKPOINT = re.compile(r'checkpoint-e(\d+)-s(\d+)\.pth$')

# The layout of the checkpoints this code writes ('format_version'), raised when a key changes meaning or a
# resume needs a new one; files without it (older ones, the official and the original scripts') are version 0.
FORMAT_VERSION = 1


class TrainingInterrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it."""

    def __init__(self, signum: int, where: str, path: Optional[str], saved: str = ''):
        self.signum, self.path = signum, path
        if not saved:
            saved = f'saved checkpoint {path}' if path else 'saved no checkpoint (no --output_dir)'
        super().__init__(f'stopped by {signal.Signals(signum).name} {where}; {saved}; continue with --resume auto')


# ---------------------------------------------------------------------------------------------
# What a checkpoint holds, and how it is written and restored
# ---------------------------------------------------------------------------------------------

def save_atomic(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (see utils.write_atomic)."""
    utils.write_atomic(path, lambda f: torch.save(obj, f))


def save_on_master(obj, path: str) -> None:
    if utils.is_main_process():
        save_atomic(obj, path)


@dataclass
class TrainingState:
    """What a checkpoint saves and restores: the objects being trained and where the run stands."""
    model: torch.nn.Module  # without the DDP wrapper: official key names
    optimizer: torch.optim.Optimizer
    lr_scheduler: Scheduler
    loss_scaler: LossScaler
    model_ema: Optional[ModelEmaV3]
    run_args: Dict[str, object]  # the run's arguments as plain data (config.plain_args), saved as 'args'
    samples_per_step: int  # per process: --batch-size x --grad-accum-steps
    max_accuracy: float = 0.0
    start_epoch: int = 0
    start_step: int = 0  # steps of start_epoch already done (a step checkpoint)
    metrics_state: Optional[dict] = None  # that partial epoch's running averages
    classes: Optional[List[str]] = None  # the data's class names in label order (ImageNet: synset ids)
    class_descriptions: Optional[List[str]] = None  # human-readable names where known (ImageNet's)

    def payload(self, epoch: int, steps_done: Optional[int] = None, metrics: Optional[dict] = None) -> dict:
        """The official layout ({'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', ...}) plus
        what an exact mid-epoch resume needs. ``steps_done`` is None for an epoch-end checkpoint."""
        return {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'lr_scheduler': self.lr_scheduler.state_dict(),
            'epoch': epoch,
            'step': steps_done,
            'model_ema': self.model_ema.module.state_dict() if self.model_ema is not None else None,
            'scaler': self.loss_scaler.state_dict(),
            'args': self.run_args,
            'max_accuracy': self.max_accuracy,
            'train_metrics': metrics,
            'sampler': {'epoch': epoch, 'start_index': (steps_done or 0) * self.samples_per_step},
            'rng': seeding.capture_rng_state(),
            'classes': self.classes,
            'class_descriptions': self.class_descriptions,
            'format_version': FORMAT_VERSION,
        }

    def resume(self, path: str, *, weights_only: bool, opt: str, batch_size: int, accum_steps: int,
               world_size: int, scaled_lr: float, layer_decay: Optional[float] = None) -> None:
        """Restore the checkpoint at ``path``: its weights only with ``weights_only`` (--eval), else
        everything, so that training continues at ``start_epoch`` / ``start_step`` where it stopped."""
        ckpt = weights.load_checkpoint(path)
        check_format_version(ckpt, path)
        weights.load_state_checked(self.model, weights.model_state_from_checkpoint(ckpt, path), f'--resume {path}',
                                   checkpoint=ckpt, name=str(self.run_args.get('model', '')))
        print(f'Resumed model weights from {path}')
        if weights_only or not all(k in ckpt for k in ('optimizer', 'lr_scheduler', 'epoch')):
            return
        saved_args = ckpt.get('args') or {}
        saved_opt = saved_args.get('opt', opt)
        if saved_opt != opt:
            raise utils.UserError(f'--resume {path} was trained with --opt {saved_opt}: resume with the same '
                                  f'--opt, or start from its weights with --finetune')
        saved_decay = saved_args.get('layer_decay')
        if saved_decay != layer_decay:  # other parameter groups: the optimizer state would not fit them
            given = f'--layer-decay {saved_decay}' if saved_decay is not None else 'no --layer-decay'
            raise utils.UserError(f'--resume {path} was trained with {given}: resume with the same, or start '
                                  f'from its weights with --finetune')
        load_optimizer_state(self.optimizer, ckpt['optimizer'])
        self.lr_scheduler.load_state_dict(ckpt['lr_scheduler'])
        note_other_total_batch(saved_args, batch_size, world_size, scaled_lr, self.lr_scheduler.base_values[0], path)
        self.loss_scaler.load_state_dict(ckpt.get('scaler') or {})
        if self.model_ema is not None and ckpt.get('model_ema'):
            weights.load_state_checked(self.model_ema.module, ckpt['model_ema'], f'--resume {path} (EMA)')
        self.max_accuracy = float(ckpt.get('max_accuracy', 0.0))
        if ckpt.get('step') is None:  # an epoch-end checkpoint (also every official one)
            self.start_epoch, self.start_step = ckpt['epoch'] + 1, 0
        else:
            self.start_epoch = ckpt['epoch']
            self.start_step = step_to_resume_at(ckpt, path, batch_size, accum_steps, world_size)
            self.metrics_state = ckpt.get('train_metrics')
        if ckpt.get('rng'):
            seeding.restore_rng_state(ckpt['rng'])
        self.lr_scheduler.step(self.start_epoch)

    def save(self, path: str, epoch: int) -> None:
        save_on_master(self.payload(epoch), path)


def check_format_version(ckpt: dict, path: str) -> None:
    """Refuse a checkpoint written by a newer version of this code: resuming it would ignore what it adds."""
    version = ckpt.get('format_version', 0) if isinstance(ckpt, dict) else 0
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise utils.UserError(f'--resume {path} has checkpoint format {version}, newer than the {FORMAT_VERSION} this '
                              f'code reads: resume it with the version of deit that wrote it (or newer), or start '
                              f'from its weights with --finetune')


# How the optimizer runs, not what it learnt: this run's choice (speedups.optimizer_kwargs, the device), never
# the saved one. GradScaler hands the loss scale to an optimizer built fused, so a fused optimizer made
# non-fused by a checkpoint fails its first fp16 step.
OPTIMIZER_IMPLEMENTATION = ('fused', 'foreach', 'capturable', 'differentiable')


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping the implementation flags the optimizer was built with
    (load_state_dict replaces them with the saved ones) and filling the options a group was saved
    without (apex's FusedLAMB saves no trust_clip / always_adapt, which timm's Lamb reads) from the
    built group."""
    built = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, built):
        for key, value in options.items():
            if key in OPTIMIZER_IMPLEMENTATION or key not in group:
                group[key] = value
        if group.get('fused') or group.get('capturable'):  # these keep 'step' as a float32 tensor by the parameter
            for param in group['params']:
                step = optimizer.state.get(param, {}).get('step')
                if isinstance(step, torch.Tensor):
                    optimizer.state[param]['step'] = step.to(device=param.device, dtype=torch.float32)


def step_to_resume_at(ckpt: dict, path: str, batch_size: int, accum_steps: int, world_size: int) -> int:
    """The first optimizer step to train, in this run's step size, of the epoch a step checkpoint stopped in.

    The checkpoint records how many samples of its epoch each process had trained: another step size
    (--batch-size x --grad-accum-steps) continues at that very sample if it is a step boundary, else is
    refused. Another number of processes deals the epoch's samples differently, so it cannot continue
    mid-epoch at all.
    """
    saved = ckpt.get('args') or {}
    saved_batch, saved_world = saved.get('batch_size', batch_size), saved.get('world_size', world_size)
    saved_accum = saved.get('grad_accum_steps', 1)
    epoch = ckpt['epoch']
    position = (ckpt.get('sampler') or {}).get('start_index', ckpt['step'] * saved_batch * saved_accum)
    if saved_world != world_size:
        raise utils.UserError(f'--resume {path} stopped in the middle of epoch {epoch} with {saved_world} '
                              f'processes: resume it with {saved_world} processes, or resume from an epoch-end '
                              f'checkpoint (checkpoint.pth)')
    step_samples = batch_size * accum_steps
    if position % step_samples:
        raise utils.UserError(f'--resume {path} stopped after sample {position} of epoch {epoch} (per process), '
                              f'not a step boundary with --batch-size {batch_size} --grad-accum-steps '
                              f'{accum_steps}: resume with --batch-size {saved_batch} --grad-accum-steps {saved_accum}')
    if (batch_size, accum_steps) != (saved_batch, saved_accum):
        print(f'note: --batch-size {batch_size} --grad-accum-steps {accum_steps} (the checkpoint used '
              f'{saved_batch} x {saved_accum}): epoch {epoch} continues at sample {position}, '
              f'step {position // step_samples}')
    return position // step_samples


def note_other_total_batch(saved_args: dict, batch_size: int, world_size: int, scaled_lr: float,
                           resumed_lr: float, path: str) -> None:
    """One line when a run resumes with another total batch than it was trained with: the restored
    schedule keeps the learning rate scaled for the old total batch."""
    old_batch, old_world = saved_args.get('batch_size', batch_size), saved_args.get('world_size', world_size)
    if (old_batch, old_world) == (batch_size, world_size):
        return
    print(f'note: {path} was trained with {old_world} processes x batch {old_batch}, this run has {world_size} x '
          f'{batch_size}: the learning-rate schedule continues as saved (lr {resumed_lr:.3g}, not the '
          f'{scaled_lr:.3g} of this total batch); --finetune starts a new schedule from its weights')


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from
# ---------------------------------------------------------------------------------------------

def is_readable_checkpoint(path: str) -> bool:
    """A complete torch zip archive: a truncated or corrupted file fails the CRC check."""
    return zipfile.is_zipfile(path) and not weights.checkpoint_damage(path)


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
    """How many times torchrun (--max-restarts) has restarted this job's workers, the highest count of any
    rank: each node's agent counts its own restarts, so a node restarted because another one failed says 0."""
    own = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
    if not utils.is_dist_avail_and_initialized():
        return own
    counts = [0] * utils.get_world_size()
    torch.distributed.all_gather_object(counts, own)  # every rank then takes the same branch of resume_source
    return max(counts)


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
# A new run in a directory that holds another one
# ---------------------------------------------------------------------------------------------

# What a run writes to its output directory (besides the lock): the files a new run there would replace.
RUN_FILES = ('checkpoint.pth', 'best_checkpoint.pth', 'checkpoint-e*-s*.pth', 'log.txt', 'summary.csv', 'args.yaml',
             'tensorboard', 'wandb', 'wandb_run_id.txt')


def previous_run_files(output_dir: str) -> List[str]:
    return sorted(path for pattern in RUN_FILES for path in glob.glob(os.path.join(output_dir, pattern)))


def previous_run_refusal(output_dir: str, start_over: bool, resume_requested: bool) -> str:
    """Why a run starting at epoch 0 must not go on in ``output_dir`` ('' if it may), having moved a previous
    run's files aside to ``output_dir/previous-<time>/`` where it may: never deleted, never overwritten.

    A directory with another run's checkpoints is refused unless ``start_over`` (--start-over), or unless
    --resume auto found none of them readable (the user asked to continue; they are kept aside).
    """
    files = previous_run_files(output_dir)
    checkpoints = [os.path.basename(p) for p in files if p.endswith('.pth')]
    if checkpoints and not (start_over or resume_requested):
        return (f'--output_dir {output_dir} holds another run ({", ".join(checkpoints[:3])}): continue it with '
                f'--resume auto, or give a new run another --output_dir (--start-over starts again here, '
                f'moving its files to {os.path.join(output_dir, "previous-<time>")})')
    if files:
        aside = os.path.join(output_dir, f'previous-{time.strftime("%Y%m%d-%H%M%S")}')
        suffix = 1
        while os.path.exists(aside if suffix == 1 else f'{aside}-{suffix}'):
            suffix += 1
        aside = aside if suffix == 1 else f'{aside}-{suffix}'
        try:
            os.mkdir(aside)
            for path in files:
                os.rename(path, os.path.join(aside, os.path.basename(path)))
        except OSError as e:  # a verdict, not an exception: the other ranks wait for it
            return f'cannot move the previous run\'s files in {output_dir} to {aside}: {e.strerror}'
        print(f'Starting a new run in {output_dir}: the previous run\'s files are kept in {aside}')
    return ''


def set_aside_previous_run(output_dir: str, start_over: bool, resume_requested: bool) -> None:
    """previous_run_refusal on rank 0 (the one that writes), its verdict shared: every rank refuses alike."""
    with utils.failing_together():  # moving the files aside may fail on rank 0
        verdict = [previous_run_refusal(output_dir, start_over, resume_requested) if utils.is_main_process() else None]
    if utils.is_dist_avail_and_initialized():
        torch.distributed.broadcast_object_list(verdict, src=0, device=utils.collective_device())
    if verdict[0]:
        utils.raise_everywhere(utils.UserError(verdict[0]))


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
    os.fsync(lock.fileno())  # other nodes read it (check_same_output_dir)
    remove_stale_temporaries(output_dir)
    return lock


def claim_output_dir_of_the_job(output_dir: str) -> Optional[IO[str]]:
    """claim_output_dir by rank 0, its outcome known to every rank (a refusal ends them all), then every
    rank checks that it sees the directory rank 0 claimed (check_same_output_dir)."""
    with utils.failing_together():
        lock = claim_output_dir(output_dir)
    if utils.get_world_size() > 1:
        holder = [read_lock_holder(output_dir) if utils.is_main_process() else None]
        torch.distributed.broadcast_object_list(holder, src=0, device=utils.collective_device())
        with utils.failing_together():
            check_same_output_dir(output_dir, holder[0])
    return lock


def read_lock_holder(output_dir: str) -> str:
    try:
        with open(os.path.join(output_dir, LOCK_FILE)) as f:
            return f.read().strip()
    except OSError:
        return ''


def check_same_output_dir(output_dir: str, holder: str, patience_s: float = 10) -> None:
    """Refuse an --output_dir that is not the one rank 0 writes (a node-local path on a multi-node run):
    the checkpoint rank 0 writes there must be readable by every rank to resume. A network file system
    may show a new file late: ``patience_s`` seconds are given to it before refusing."""
    deadline = time.time() + patience_s
    while read_lock_holder(output_dir) != holder:
        if time.time() > deadline:
            raise utils.UserError(
                f'--output_dir {output_dir} on {socket.gethostname()} is not the directory rank 0 writes ({holder}): '
                f'every node must see the same --output_dir (a shared file system), or the checkpoints '
                f'rank 0 writes cannot be resumed by the others')
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------

# How long a stop signal waits for a batch that does not come (a data worker stuck in a read) before the run
# stops with the step checkpoint of the last finished step: well inside the 30 s that Slurm and torchrun
# leave between SIGTERM and SIGKILL, and far longer than a healthy loader keeps the trainer waiting.
DATA_WAIT_SECONDS = 10.0

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
        self.waiting_for_data = False  # set around each fetch of a training batch (Checkpointer.watch)

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
        # A step whose batch never comes never ends: check, from DATA_WAIT_SECONDS on, whether the trainer still
        # waits for data (SIGALRM interrupts a blocked read in this process as well as the wait for a worker).
        signal.signal(signal.SIGALRM, self._data_deadline)
        signal.setitimer(signal.ITIMER_REAL, DATA_WAIT_SECONDS, 1.0)

    def _data_deadline(self, signum, frame) -> None:
        if self.waiting_for_data:
            self.disarm()
            raise DataWaitExpired()

    @staticmethod
    def disarm() -> None:
        """No more data deadline (the run is over)."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    def ignore(self) -> None:
        """From now on the stop signals are ignored: the run is ending anyway."""
        for signum in ((signal.SIGUSR2, signal.SIGINT) if self.submitit_handler else
                       (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
            signal.signal(signum, signal.SIG_IGN)

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
        result = None
        while self.pending:
            values = self.read_oldest()
            result = values if result is None else [max(a, b) for a, b in zip(result, values)]
        return result or [0]


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

    def _requests(self, failed: bool) -> Tuple[Optional[int], bool, bool]:
        """(stop signal, time-based save due, a rank failed), the same on every rank."""
        overdue = bool(self.every_seconds) and time.time() - self.last_save >= self.every_seconds
        if self.agreement is None:
            return self.signals.signum, overdue, failed
        agreed = self.agreement.exchange([self.signals.signum or 0, int(overdue), int(failed)])
        if agreed is None:
            return None, False, False
        return agreed[0] or None, bool(agreed[1]), bool(agreed[2])

    def after_step(self, epoch: int, steps_done: int, metrics: Callable[[], dict],
                   before_save: Callable[[], None] = lambda: None, failed: bool = False,
                   epoch_trained: bool = False) -> None:
        """Called with the number of finished steps of the epoch; raises TrainingInterrupted to stop.

        The last step of an epoch (``epoch_trained``) is always saved: whatever happens in the evaluation
        before checkpoint.pth is written (an error, a kill, an out-of-memory), the epoch's training is kept.

        ``metrics()`` gives the epoch's running sums of all ranks and ``before_save()`` raises if the state
        must not be saved (a non-finite loss, a failed rank); both are collectives, called on every rank,
        and only when a checkpoint is written or a rank said it ``failed``, since reading device values
        back waits for the device.
        """
        signum, overdue, a_rank_failed = self._requests(failed)
        if a_rank_failed:
            before_save()  # raises on every rank, a few steps after the failure whatever --print-freq
        due = (self.every_steps and steps_done % self.every_steps == 0) or overdue or epoch_trained
        path = None
        if self.output_dir and (due or signum):
            before_save()
            path = self.save(epoch, steps_done, metrics())
        if signum:
            raise TrainingInterrupted(signum, f'after step {steps_done} of epoch {epoch}', path)

    def watch(self, loader) -> 'WatchedBatches':
        """``loader``, its every fetch marked as a wait for data (the stop signals' data deadline)."""
        return WatchedBatches(loader, self.signals)

    def stop_waiting_for_data(self, epoch: int, steps_done: int, metrics: Callable[[], dict],
                              before_save: Callable[[], None] = lambda: None) -> None:
        """A stop signal came and the next batch did not, DATA_WAIT_SECONDS later: save the last finished step
        (one process; ranks cannot agree on a step while one of them waits) and stop."""
        path, saved = None, ''
        if self.output_dir and self.agreement is None:
            before_save()
            path = self.save(epoch, steps_done, metrics())
        elif self.agreement is not None:
            saved = 'the last checkpoint written is kept (the ranks cannot agree on a step while one waits)'
        end_data_workers()
        raise TrainingInterrupted(self.signals.signum or signal.SIGTERM,
                                  f'after step {steps_done} of epoch {epoch} (the next batch did not come within '
                                  f'{DATA_WAIT_SECONDS:g} s: a data-loader read is stuck)', path, saved)

    def after_epoch(self, epoch: int, path: Optional[str]) -> None:
        """Called once the epoch's checkpoint.pth is written: its step checkpoints are obsolete (removed);
        stop here if a signal came during the last steps or the evaluation."""
        if self.output_dir and utils.is_main_process():
            self.prune(finished_epoch=epoch)
        signum = self.signals.signum
        if self.agreement is not None:  # every exchange in flight, and one more now (a wait, once an epoch)
            latest = self.agreement.exchange([signum or 0, 0, 0]) or [0]
            signum = max(latest[0], self.agreement.drain()[0]) or None
        if signum:
            raise TrainingInterrupted(signum, f'at the end of epoch {epoch}', path)

    def save(self, epoch: int, steps_done: int, metrics: dict) -> str:
        """Rank 0 writes the step checkpoint; every rank waits for it and learns whether it was written."""
        path = os.path.join(self.output_dir, f'checkpoint-e{epoch:04d}-s{steps_done:06d}.pth')
        with utils.failing_together():
            if utils.is_main_process():
                save_atomic(self.payload(epoch, steps_done, metrics), path)
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
                try:
                    os.remove(path)
                except OSError as e:  # a leftover is harmless: --resume auto reads positions, not names
                    print(f'warning: cannot remove the obsolete step checkpoint {path}: {e.strerror}')


class WatchedBatches:
    """A data loader whose every fetch sets ``signals.waiting_for_data`` while it waits (its length is the
    loader's, for the progress line)."""

    def __init__(self, loader, signals: StopSignals):
        self.loader, self.signals = loader, signals

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.signals.waiting_for_data = True  # starting the workers is a wait too
        try:
            batches = iter(self.loader)
        finally:
            self.signals.waiting_for_data = False
        while True:
            self.signals.waiting_for_data = True
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.signals.waiting_for_data = False
            yield batch


def end_data_workers() -> None:
    """SIGKILL this process's data-loader workers: one stuck in a read ignores the SIGTERM of the loader's
    shutdown (ignore_stop_signals), and Python's exit would wait for it forever."""
    for worker in multiprocessing.active_children():
        worker.kill()
