"""Run under torch.distributed.run (gloo, CPU) by test_hardening: what each rank sees, written as JSON.

Usage: two_ranks.py SCENARIO OUT_DIR. Scenarios: ``nan`` (a non-finite loss on rank 1 only),
``signal`` (a stop signal received by rank 1 only) and ``restart`` (only rank 1's torchrun agent counts a
restart, as on a node restarted because another node failed).
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
from engine import LossScaler, TrainOptions, train_one_epoch  # noqa: E402
from losses import DistillationLoss  # noqa: E402
from utils import AgreedFailure  # noqa: E402


def nan_on_rank_one(rank: int) -> str:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(6)]
    if rank == 1:
        batches[2][0][0, 0] = float('inf')
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.0, 1.0)
    try:
        train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, LossScaler(False, 'cpu'),
                        TrainOptions(print_freq=4))
    except AgreedFailure as e:  # raised on every rank, with the exit code of a non-finite loss
        return f'{e.exit_code}: {e}'
    return 'finished'


def signal_on_rank_one(rank: int) -> str:
    signals = checkpoint.StopSignals()
    checkpointer = checkpoint.Checkpointer('', payload=None, signals=signals)
    try:
        for step in range(1, 50):
            if rank == 1 and step == 5:
                signals.signum = signal.SIGTERM  # what the handler records
            checkpointer.after_step(0, step, metrics=dict)
    except checkpoint.TrainingInterrupted as stop:
        return str(stop)
    return 'finished'


def restart_seen_by_rank_one(rank: int, out: Path) -> str:
    os.environ['TORCHELASTIC_RESTART_COUNT'] = str(rank)
    return checkpoint.resume_source('', str(out))


if __name__ == '__main__':
    scenario, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    if scenario == 'restart':
        result = restart_seen_by_rank_one(rank, out)
    else:
        result = {'nan': nan_on_rank_one, 'signal': signal_on_rank_one}[scenario](rank)
    (out / f'rank{rank}.json').write_text(json.dumps(result))
    dist.destroy_process_group()
