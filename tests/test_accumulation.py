"""Gradient accumulation (--grad-accum-steps) and activation checkpointing (--grad-checkpointing).

The defining property of accumulation: K micro-batches of B images make the same optimizer step as
one batch of K x B. With the randomness that differs between batch sizes switched off (mixup, cutmix,
erasing, dropout, drop-path: each draws per batch), the samples, their augmentations (seeded per
position in the epoch) and so the weights match, step by step.
"""
import shutil
import signal
import sys
import time

import pytest
import timm
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import main
from conftest import FAST, assert_one_line_error, run_cli, run_main
from engine import LossScaler, TrainOptions, train_one_epoch
from imagefolder import make_imagefolder
from losses import DistillationLoss
from test_resilience import assert_same_tensors, popen_main, progress

# No per-batch randomness; EMA decay and clipping small enough that a miscounted update or a
# gradient clipped per micro-batch shows.
SAME_SAMPLES = ['--model', 'test_vit', *FAST, '--mixup', '0', '--cutmix', '0', '--reprob', '0',
                '--drop', '0', '--drop-path', '0', '--model-ema-decay', '0.5', '--clip-grad', '0.5',
                '--no-repeated-aug', '--deterministic', '--save-interval-steps', '1', '--keep-last', '20']


def assert_close_states(a: dict, b: dict, where: str, atol: float):
    assert a.keys() == b.keys(), where
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f'{where}.{k}: {m}')


def max_change(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def accumulation_runs(tmp_path_factory):
    """One process, 2 epochs of 72 images: 2 steps of 32 per epoch (8 images dropped), as
    K=1 x batch 32 and as K=4 x batch 8."""
    root = tmp_path_factory.mktemp('accum')
    data = make_imagefolder(root / 'data', num_classes=3, train_per_class=24, val_per_class=4)
    runs = {}
    for accum, batch in ((1, 32), (4, 8)):
        runs[accum] = root / f'k{accum}'
        run_cli('--data-path', data, *SAME_SAMPLES, '--epochs', '2', '--batch-size', batch,
                '--grad-accum-steps', accum, '--output_dir', runs[accum])
    return data, runs


def test_four_micro_batches_of_8_reach_the_weights_of_one_batch_of_32(accumulation_runs):
    _, runs = accumulation_runs
    one, four = (torch.load(runs[k] / 'checkpoint.pth', weights_only=True) for k in (1, 4))
    for key in ('model', 'model_ema'):
        assert_close_states(one[key], four[key], key, atol=2e-6)
    # the tolerance is far below what the last steps moved the weights (the EMA, decay 0.5, lags them)
    assert max_change(one['model'], one['model_ema']) > 2e-5
    assert four['args']['lr'] == pytest.approx(5e-4 * 32 / 512)  # scaled by the effective batch
    # 2 epochs of 2 optimizer steps: one AdamW step per 4 micro-batches
    assert int(one['optimizer']['state'][0]['step']) == int(four['optimizer']['state'][0]['step']) == 4


def test_accumulated_run_stopped_mid_run_and_resumed_is_bit_identical(accumulation_runs, tmp_path):
    data, runs = accumulation_runs
    flags = ['--data-path', data, *SAME_SAMPLES, '--epochs', '2', '--batch-size', 8, '--grad-accum-steps', 4,
             '--output_dir', tmp_path / 'run']
    proc = popen_main(*flags)
    while progress(tmp_path / 'run') is None and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the step under way finishes, its step checkpoint is written
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    epoch, steps = progress(tmp_path / 'run')
    stopped = tmp_path / 'stopped.pth'
    shutil.copy(tmp_path / 'run' / f'checkpoint-e{epoch:04d}-s{steps:06d}.pth', stopped)

    resumed = run_cli(*flags, '--resume', 'auto')
    assert f'Continuing at epoch {epoch} step {steps}' in resumed.stdout
    ours = torch.load(tmp_path / 'run' / 'checkpoint.pth', weights_only=True)
    ref = torch.load(runs[4] / 'checkpoint.pth', weights_only=True)
    for key in ('model', 'model_ema', 'optimizer'):
        assert_same_tensors(ours[key], ref[key], key)

    # without accumulation the same sample is the boundary of a step of 8 images, 4 times further
    other = run_cli('--data-path', data, *SAME_SAMPLES, '--epochs', '2', '--batch-size', 8,
                    '--output_dir', tmp_path / 'other', '--resume', stopped)
    assert f'epoch {epoch} continues at sample {32 * steps}, step {4 * steps}' in other.stdout


def test_torchrun_two_processes_accumulate_like_one_larger_batch(tmp_path):
    """Per process 4 x 8 vs 1 x 32 (64 images a step over 2 ranks); 144 images: 2 steps per epoch."""
    data = make_imagefolder(tmp_path / 'data', num_classes=3, train_per_class=48, val_per_class=2)
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'main.py')
    for accum, batch in ((1, 32), (4, 8)):
        run_main('--data-path', data, *SAME_SAMPLES, '--epochs', '1', '--batch-size', batch,
                 '--grad-accum-steps', accum, '--output_dir', tmp_path / f'k{accum}', launcher=torchrun)
    one, four = (torch.load(tmp_path / f'k{k}' / 'checkpoint.pth', weights_only=True) for k in (1, 4))
    for key in ('model', 'model_ema'):
        assert_close_states(one[key], four[key], key, atol=2e-6)
    assert max_change(one['model'], one['model_ema']) > 1e-5
    assert int(one['optimizer']['state'][0]['step']) == int(four['optimizer']['state'][0]['step']) == 2
    assert one['args']['lr'] == four['args']['lr'] == pytest.approx(5e-4 * 64 / 512)


def counting_allreduce_hook(calls: list, bucket):
    """A DDP communication hook that counts its all-reduces (one per gradient bucket synced)."""
    calls.append(1)
    return default_hooks.allreduce_hook(None, bucket)


def test_ddp_synchronises_gradients_only_on_the_last_micro_batch_of_a_step(tmp_path):
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
        calls = []
        model.register_comm_hook(calls, counting_allreduce_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,)), []) for _ in range(8)]
        criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
        train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, LossScaler(False, 'cpu'),
                        TrainOptions(accum_steps=4, print_freq=100))
        assert len(calls) == 2  # 8 micro-batches, 2 optimizer steps: one bucket synced per step
    finally:
        torch.distributed.destroy_process_group()


def test_grad_accum_steps_must_be_positive(tmp_path):
    proc = run_cli('--data-path', tmp_path, '--model', 'deit_tiny_patch4_32', *FAST, '--grad-accum-steps', '0',
                   check=False)
    assert_one_line_error(proc, 'error: --grad-accum-steps must be positive')


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes that autograd keeps for the backward pass of one forward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model(images)
    return sum(saved)


def test_grad_checkpointing_gives_the_same_loss_and_gradients_with_less_saved_memory():
    args = main.get_args_parser().parse_args(['--model', 'deit_tiny_patch4_32', '--input-size', '32',
                                              '--grad-checkpointing', '--distillation-type', 'none'])
    checkpointed = main.build_model(args, nb_classes=3)  # with drop-path: the recomputation must redraw it alike
    plain = timm.create_model('deit_tiny_patch4_32', num_classes=3, drop_path_rate=args.drop_path)
    plain.load_state_dict(checkpointed.state_dict())
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    assert_close_states(results[0][1], results[1][1], 'grad', atol=1e-6)
    assert saved_activation_bytes(checkpointed, images) < 0.2 * saved_activation_bytes(plain, images)


def test_grad_checkpointing_on_a_model_without_it_is_one_clear_error(tmp_path):
    proc = run_cli('--data-path', tmp_path, '--model', 'convit_tiny', *FAST, '--grad-checkpointing', check=False)
    assert_one_line_error(proc, 'error: --model convit_tiny does not support --grad-checkpointing')
