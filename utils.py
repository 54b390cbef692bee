"""Generic helpers of the training entry points: user errors, distributed setup, progress logging,
atomic file writes. Checkpoints are checkpoint.py's, reading weights weights.py's."""
import builtins
import contextlib
import csv
import datetime
import errno
import io
import json
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Optional
from urllib.parse import urlparse

import torch
import torch.distributed as dist


class RunError(Exception):
    """A failure that ends a run with one line (never a traceback) and an exit code of its own."""
    exit_code = 1


class UserError(RunError):
    """A mistake in the command line or the inputs: reported as one line, exit code 2."""
    exit_code = 2


class SaveError(RunError):
    """The OS refused to write a file of the run (disk full, read-only, I/O error): one line, exit code 4.

    Files are replaced atomically, so the previous version of the file is intact.
    """
    exit_code = 4

    def __init__(self, path, error: OSError):
        name = errno.errorcode.get(error.errno, 'unknown error')
        super().__init__(f'cannot write {path}: {error.strerror or error} ({name}); its previous version, if any, '
                         f'is intact: free space or fix the file system, then continue with --resume auto')


def os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError that caused ``error``, if any (torch.save reports a failed write as a RuntimeError)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------

# How long a collective waits for the other ranks before failing. Failures that a rank sees are agreed
# (agree_on_failure), so this bounds only a rank that vanished where no launcher ends the others (see
# docs/reliability.md); it must exceed the longest wait of a healthy run: ranks waiting while rank 0
# alone writes a checkpoint (a minute for a large model on a slow network file system).
DIST_TIMEOUT = datetime.timedelta(minutes=10)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on every rank but the first; print(..., force=True) still prints."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


class ParserDefault(str):
    """A flag's default value, told apart from the same value given on the command line or in a --config
    (argparse stores a string default as it is): e.g. the default --device falls back to the CPU silently."""


class ParserDefaultInt(int):
    """ParserDefault of an int flag (argparse keeps a default that is not a string as it is)."""


def is_parser_default(value) -> bool:
    return isinstance(value, (ParserDefault, ParserDefaultInt))


DEFAULT_DEVICE = ParserDefault('cuda')


def resolve_device(requested: str) -> torch.device:
    """The requested device, or the CPU where CUDA is absent: with one warning line when the user asked
    for CUDA, silently for the default (DEFAULT_DEVICE)."""
    device = torch.device(requested)
    if device.type == 'cuda' and not torch.cuda.is_available():
        if not is_parser_default(requested):
            print(f"warning: --device {requested} requested but CUDA is not available; using the CPU")
        return torch.device('cpu')
    return device


def init_distributed_mode(args) -> None:
    """Join the torch.distributed job described by the environment (torchrun, launch, submitit).

    Sets args.distributed, args.rank, args.world_size, args.gpu. Without those variables the run
    is a single process.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    else:
        print('Not using distributed mode')
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, args.device.index or 0
        if args.device.type == 'cuda':  # --device cuda:N: its context, its properties (bf16), not GPU 0's
            torch.cuda.set_device(args.gpu)
        return

    args.distributed = True
    device_id = None
    if args.device.type == 'cuda':
        visible = torch.cuda.device_count()
        if args.gpu >= visible:
            raise UserError(f'LOCAL_RANK {args.gpu} but this process sees {visible} GPU(s): start at most {visible} '
                            f'processes per node (--nproc_per_node), or check CUDA_VISIBLE_DEVICES')
        torch.cuda.set_device(args.gpu)
        args.device = device_id = torch.device('cuda', args.gpu)
        backend = 'nccl'
    else:
        backend = 'gloo'
    print(f'| distributed init (rank {args.rank}, world {args.world_size}, {backend}): {args.dist_url}',
          flush=True)
    join_process_group(backend, args.rank, args.world_size, device_id, args.dist_url)
    setup_for_distributed(args.rank == 0)


# How many process groups this torchrun job has formed, counted in its agent's store (join_process_group).
FORMED_GROUPS_KEY = 'deit/formed_groups'


def torchrun_agent_store() -> Optional[dist.TCPStore]:
    """The store that torchrun's agent serves to its workers (TORCHELASTIC_USE_AGENT_STORE), else None."""
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    return dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                         timeout=DIST_TIMEOUT)


def join_process_group(backend: str, rank: int, world_size: int, device_id: Optional[torch.device],
                       dist_url: str) -> None:
    """init_process_group, then a barrier: every rank is connected when this returns.

    Under torchrun the group forms in the agent's store under a prefix of this attempt: the agent keeps one
    store for the whole job and the workers it restarts (--max-restarts) join it again, where among the
    keys of the attempt before a new rank finds a dead rank's address, then fails or hangs connecting.
    The prefix is the number of groups formed so far: the same on every rank and node (unlike
    TORCHELASTIC_RESTART_COUNT, counted per node), raised once this group has formed, so before any
    worker of a next attempt starts.
    """
    agent = torchrun_agent_store() if dist_url == 'env://' else None
    if agent is None:
        rendezvous = {'init_method': dist_url}
    else:
        rendezvous = {'store': dist.PrefixStore(f'deit/attempt{agent.add(FORMED_GROUPS_KEY, 0)}', agent)}
    # device_id binds NCCL to this rank's GPU at once (no guessing, eager connection setup)
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank, device_id=device_id,
                            timeout=DIST_TIMEOUT, **rendezvous)
    dist.barrier()
    if agent is not None and rank == 0:
        agent.add(FORMED_GROUPS_KEY, 1)


def leave_distributed() -> None:
    """Destroy the process group if there is one: NCCL frees its communicators before the process exits."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Failures seen by some ranks only
# ---------------------------------------------------------------------------------------------

class AgreedFailure(RunError):
    """A failure every rank has learnt of, raised on every rank with the exit code of the failure.

    ``rank`` is the rank that failed (its own line is printed already), or None for a failure of the
    whole job (a non-finite loss, found by an all-reduce).
    """

    def __init__(self, exit_code: int, rank: Optional[int], message: str):
        self.exit_code, self.rank, self.message = exit_code, rank, message
        super().__init__(message if rank is None else f'rank {rank} failed: {message}')


def rank_prefix() -> str:
    """'[rank R] ' in a job of several processes (also before the group has formed), else ''."""
    if is_dist_avail_and_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    return f'[rank {rank}] ' if world > 1 else ''


def print_error(message: object) -> None:
    """'[rank R] error: ...' on stderr, on whichever rank calls it (setup_for_distributed silences print)."""
    sys.stderr.write(f'{rank_prefix()}error: {message}\n')
    sys.stderr.flush()


def stderr_identity() -> tuple:
    """Where this process's stderr goes: ranks whose stderr is one file or terminal (torchrun's children)
    share a log, where a second copy of a message would only repeat it."""
    try:
        st = os.fstat(sys.stderr.fileno())
        return socket.gethostname(), st.st_dev, st.st_ino
    except (OSError, ValueError, io.UnsupportedOperation):  # no file behind it (a test's capture)
        return socket.gethostname(), os.getpid()


def collective_device() -> torch.device:
    """The device of this rank's collectives (NCCL needs CUDA tensors)."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def agree_on_failure(failure: Optional[RunError]) -> None:
    """A collective: raise AgreedFailure on every rank if any rank passes a failure (printed already).

    One all-reduce of one number (exit code and rank) when no rank failed. Otherwise the failing rank
    (the highest exit code, then the lowest rank) broadcasts its message, and rank 0 names it once.
    In a single process the failure itself is raised.
    """
    if get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    world, rank = get_world_size(), get_rank()
    key = (failure.exit_code << 32 | (world - rank)) if failure is not None else 0
    agreed = int(all_reduce_max(torch.tensor(key, dtype=torch.int64, device=collective_device())))
    if not agreed:
        return
    source, code = world - (agreed & 0xFFFFFFFF), agreed >> 32
    told = [str(failure) if rank == source else None, stderr_identity()]
    dist.broadcast_object_list(told, src=source, device=collective_device())
    message, where = told
    if rank == 0 and source != 0:
        cause = ' (its error line is above)' if where == stderr_identity() else f': {message}'
        print_error(f'rank {source} failed{cause}; every rank stops with exit code {code}')
    raise AgreedFailure(code, source, message)


def raise_everywhere(error: RunError) -> None:
    """Raise ``error``, which every rank found alike (an all-reduced result): rank 0 alone prints it."""
    if get_world_size() == 1:
        raise error
    if is_main_process():
        print_error(error)
    raise AgreedFailure(error.exit_code, None, str(error))


@contextlib.contextmanager
def failing_together():
    """Every rank leaves the block together (a collective at its end): a RunError raised inside it on
    some ranks is printed there at once, then ends every rank (AgreedFailure) instead of leaving the
    others waiting in their next collective. Only rank-local work may run inside (no collective)."""
    if get_world_size() == 1:
        yield
        return
    failure = None
    try:
        yield
    except AgreedFailure:
        raise
    except RunError as e:
        print_error(e)
        failure = e
    agree_on_failure(failure)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (identity in a single process)."""
    if is_dist_avail_and_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of a tensor over all ranks (identity in a single process)."""
    if is_dist_avail_and_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

class MetricLogger:
    """Running averages of per-step metrics, printed every ``print_freq`` steps with ETA and img/s.

    Values may be tensors: they are summed on their device and only read back (a host sync) when a
    line is printed, so training steps do not wait on the device.
    """

    def __init__(self, delimiter: str = '  '):
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self.last = {}
        self.delimiter = delimiter

    def update(self, n: int = 1, **values) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach()
            self.sums[name] = self.sums[name] + value * n
            self.counts[name] += n
            self.last[name] = value

    def synchronize_between_processes(self, device: torch.device) -> None:
        """Sum the sums and counts over all ranks, so that the averages are the whole job's."""
        state = self.summed_state_dict(device)
        self.sums.update(state['sums'])
        self.counts.update(state['counts'])

    def summed_state_dict(self, device: torch.device) -> dict:
        """state_dict with the sums and counts of all ranks (a collective: every rank calls it): what a
        step checkpoint saves, for rank 0 alone to restore."""
        if not is_dist_avail_and_initialized() or not self.sums:
            return self.state_dict()
        names = sorted(self.sums)
        totals = torch.tensor([[float(self.sums[k]), self.counts[k]] for k in names], dtype=torch.float64,
                              device=device)
        summed = all_reduce_sum(totals).tolist()
        return {'sums': {k: total for k, (total, _) in zip(names, summed)},
                'counts': {k: int(count) for k, (_, count) in zip(names, summed)}}

    def global_avg(self, name: str) -> float:
        return float(self.sums[name]) / max(self.counts[name], 1)

    def averages(self) -> dict:
        return {name: self.global_avg(name) for name in self.sums}

    def state_dict(self) -> dict:
        """Sums and counts as plain numbers, to continue an epoch's averages after a resume."""
        return {'sums': {k: float(v) for k, v in self.sums.items()}, 'counts': dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums.update(state['sums'])
        self.counts.update(state['counts'])
        self.last.update({k: v / max(state['counts'][k], 1) for k, v in state['sums'].items()})

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {float(self.last[name]):.4g} ({self.global_avg(name):.4g})'
                                   for name in self.sums)

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '', first_step: int = 0) -> Iterator:
        """Yield from ``iterable`` and show progress (step, ETA, images/s, the meters).

        On a terminal one live line is redrawn at most twice a second; in logs (Slurm, CI, pipes)
        a plain line is printed every ``print_freq`` steps and at the last one, never carriage
        returns. ``first_step`` numbers the steps of an epoch resumed in its middle.
        """
        live = sys.stdout.isatty() and is_main_process()
        total = first_step + len(iterable)
        start = last_shown = time.time()
        images = images_since_shown = 0
        width = len(str(total))
        for step, batch in enumerate(iterable, start=first_step):
            yield batch
            batch_size = len(batch[0]) if isinstance(batch, (tuple, list)) else 0
            images += batch_size
            images_since_shown += batch_size
            now = time.time()
            last = step == total - 1
            if (live and (now - last_shown >= 0.5 or last)) or (not live and (step % print_freq == 0 or last)):
                eta = (now - start) / (step + 1 - first_step) * (total - step - 1)
                rate = images_since_shown / max(now - last_shown, 1e-9)
                line = (f'{header} [{step:>{width}}/{total}]  eta: {datetime.timedelta(seconds=int(eta))}  '
                        f'{rate:.1f} img/s  {self}')
                print('\r' + line + '\x1b[K' if live else line, end='' if live else '\n', flush=True)
                last_shown, images_since_shown = now, 0
        elapsed = time.time() - start
        self.images_per_sec = images / max(elapsed, 1e-9)
        print(('\n' if live else '') + f'{header} total time: {datetime.timedelta(seconds=int(elapsed))} '
              f'({self.images_per_sec:.1f} img/s)', flush=True)


def count_over_ranks(items: Iterable) -> int:
    """How many distinct ``items`` (hashable, picklable) all ranks hold together (a collective)."""
    local = list(items)
    if not is_dist_avail_and_initialized():
        return len(set(local))
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, local)
    return len(set().union(*gathered))


def tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        return True
    except ImportError:
        return False


class EpochLog:
    """The per-epoch record of a run, written by rank 0 only.

    ``log.txt`` (one JSON line per epoch, the original format) is the source; ``summary.csv`` is
    rewritten from it after every epoch, and the same scalars go to TensorBoard when enabled
    (tags ``train/loss``, ``test/acc1``, ``test/ema_acc1`` ...).
    """

    def __init__(self, output_dir: str, tensorboard: bool = False, resume_epoch: Optional[int] = None):
        """``resume_epoch``: the first epoch a resumed run trains; records of it and later are dropped."""
        self.dir = Path(output_dir) if output_dir and is_main_process() else None
        self.writer = None
        if self.dir:
            self.repair()
        if self.dir and resume_epoch is not None:
            self.trim(resume_epoch)
        if self.dir and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events of epochs that a resumed run trains again
            self.writer = SummaryWriter(log_dir=str(self.dir / 'tensorboard'), purge_step=resume_epoch)

    def rows(self) -> list:
        log = self.dir / 'log.txt'
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def repair(self) -> None:
        """Drop the lines of log.txt that are not JSON records (a kill or power loss during an append), saying so."""
        log = self.dir / 'log.txt'
        if not log.is_file():
            return
        kept, torn = [], []
        for number, line in enumerate(log.read_text(errors='replace').splitlines(), start=1):
            try:
                kept.append(json.dumps(json.loads(line)))
            except ValueError:
                torn.append(number)
        if torn:
            print(f'warning: {log}: ignoring line{"s" if len(torn) > 1 else ""} {", ".join(map(str, torn))}, '
                  f'not a complete record (a write cut short by a kill or a power loss)')
            write_text_atomic(log, ''.join(line + '\n' for line in kept))

    def trim(self, start_epoch: int) -> None:
        """Drop the records of epochs that will run again (logged, but their checkpoint not written, or a
        checkpoint older than the log chosen by --resume), saying which."""
        rows = self.rows()
        kept = [row for row in rows if row.get('epoch', -1) < start_epoch]
        if len(kept) != len(rows):
            dropped = sorted({row.get('epoch', -1) for row in rows} - {row.get('epoch', -1) for row in kept})
            print(f'warning: the resumed checkpoint continues at epoch {start_epoch}: dropping the records of '
                  f'epoch{"s" if len(dropped) > 1 else ""} {", ".join(map(str, dropped))} from log.txt, '
                  f'summary.csv and TensorBoard (they will be trained again)')
            write_text_atomic(self.dir / 'log.txt', ''.join(json.dumps(row) + '\n' for row in kept))
            self._write_csv(kept)

    def write(self, stats: dict) -> None:
        if not self.dir:
            return
        try:
            with (self.dir / 'log.txt').open('a') as f:
                f.write(json.dumps(stats) + '\n')
        except OSError as e:
            raise SaveError(self.dir / 'log.txt', e) from None
        self._write_csv(self.rows())
        if self.writer:
            for key, value in stats.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace('_', '/', 1), value, stats['epoch'])
            self.writer.flush()

    def _write_csv(self, rows: list) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.dir / 'summary.csv', buffer.getvalue())

    def close(self) -> None:
        if self.writer:
            self.writer.close()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_atomic(path, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` so that it is always either the old or the new file.

    ``write(f)`` fills a temporary file in the same directory, which is fsynced, then renamed over
    ``path``; a kill at any moment leaves at most a stale temporary file (``.NAME.tmpPID``).
    An error of the OS (ENOSPC, EROFS, EIO, ...) becomes a SaveError naming the file.
    """
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:  # make the rename itself durable
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except Exception as e:
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise SaveError(path, cause) from e
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_text_atomic(path, text: str) -> None:
    """Replace a small text file atomically (see write_atomic)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def is_url(path: str) -> bool:
    return urlparse(path).scheme in ('http', 'https')


def first_line(error: Exception) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
