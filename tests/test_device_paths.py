"""CUDA and multi-rank code paths through their smallest CPU stand-ins (a GPU shows the rest:
``python -m tools.gpu_check``)."""
import os

import pytest
import torch

from engine import LossScaler


def test_fp16_resume_from_a_checkpoint_without_loss_scale_state_starts_at_the_initial_scale(capsys):
    scaler = LossScaler(enabled=True, device_type='cpu')  # fp16 loss scaling, as on CUDA
    scaler.load_state_dict({})  # what a bf16 / fp32 / CPU run saves
    assert scaler.state_dict()['scale'] == torch.amp.GradScaler('cpu').get_scale()
    assert 'no fp16 loss-scale state' in capsys.readouterr().out
    fp16_state = {**scaler.state_dict(), 'scale': 1024.0}
    scaler.load_state_dict(fp16_state)  # a real fp16 state still loads
    assert scaler.state_dict()['scale'] == 1024.0


def test_a_checkpoint_with_more_cuda_rng_states_than_visible_gpus_resumes(monkeypatch):
    import seeding

    def set_cuda_state(new_state, device='cuda'):  # torch's own check: the device index must exist
        index = device if isinstance(device, int) else torch.device(device).index
        if index >= torch.cuda.device_count():
            raise IndexError(f'no CUDA device {index}')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda.random, 'set_rng_state', set_cuda_state)

    saved = seeding.capture_rng_state()
    assert 'cuda' not in saved  # redundant: every step reseeds every device
    expected = torch.rand(3)
    from_8_gpus = {**saved, 'cuda': [torch.zeros(16, dtype=torch.uint8)] * 8}  # an older 8-GPU checkpoint
    seeding.restore_rng_state(from_8_gpus)
    assert torch.equal(torch.rand(3), expected)


def node(monkeypatch, affinity: int, cpu_count: int = 96, **env) -> None:
    """A node of ``cpu_count`` CPUs where this process may run on ``affinity`` of them."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(affinity)))
    monkeypatch.setattr(os, 'cpu_count', lambda: cpu_count)
    for name in ('LOCAL_WORLD_SIZE', 'TORCHELASTIC_RUN_ID', 'SLURM_CPUS_ON_NODE'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_default_workers_divide_only_an_affinity_that_the_local_ranks_share(monkeypatch):
    from main import default_num_workers
    # Slurm task binding (submitit, --cpus-per-task 10): each task has its own 10 CPUs
    node(monkeypatch, 10, LOCAL_WORLD_SIZE='8', SLURM_CPUS_ON_NODE='80')
    assert default_num_workers() == 10
    # Slurm without binding: every task sees the node's 80 allocated CPUs
    node(monkeypatch, 80, LOCAL_WORLD_SIZE='8', SLURM_CPUS_ON_NODE='80')
    assert default_num_workers() == 10
    node(monkeypatch, 40, LOCAL_WORLD_SIZE='8', SLURM_CPUS_ON_NODE='40')
    assert default_num_workers() == 5
    # torchrun's 8 children share the agent's mask, even when it is a part of the node
    node(monkeypatch, 40, LOCAL_WORLD_SIZE='8', TORCHELASTIC_RUN_ID='x')
    assert default_num_workers() == 5
    node(monkeypatch, 96, LOCAL_WORLD_SIZE='8', TORCHELASTIC_RUN_ID='x')
    assert default_num_workers() == 10
    node(monkeypatch, 2, cpu_count=2)  # one process on a small machine
    assert default_num_workers() == 2


def test_a_cpu_ema_is_evaluated_on_the_training_device_and_returns_to_the_cpu():
    """The mismatch itself (CUDA batches into a CPU EMA) needs a GPU: tools/gpu_check.py trains with
    --model-ema-force-cpu. Here: the EMA is where the batches are during the block, and home after."""
    from timm.utils import ModelEmaV3
    from main import on_device
    model = torch.nn.Linear(3, 2)
    ema = ModelEmaV3(model, decay=0.5, device=torch.device('cpu'))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    training_device = torch.device('cpu')  # 'cuda' on a GPU node
    with on_device(ema.module, training_device) as evaluated:
        assert evaluated is ema.module and next(evaluated.parameters()).device == training_device
        evaluated(torch.ones(4, 3, device=training_device))
    assert next(ema.module.parameters()).device == torch.device('cpu')
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
    ema.update(model)  # still an EMA on its own device


def test_tf32_is_on_for_cuda_unless_no_tf32_and_the_cpu_is_untouched():
    from main import get_args_parser, set_fp32_precision
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        set_fp32_precision(torch.device('cpu'), tf32=True)
        assert torch.get_float32_matmul_precision() == saved[0]
        assert get_args_parser().parse_args([]).tf32
        set_fp32_precision(torch.device('cuda'), tf32=True)  # the flags need no GPU to be set
        assert torch.get_float32_matmul_precision() == 'high' and torch.backends.cudnn.allow_tf32
        set_fp32_precision(torch.device('cuda'), tf32=get_args_parser().parse_args(['--no-tf32']).tf32)
        assert torch.get_float32_matmul_precision() == 'highest' and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_evaluate_makes_no_device_tensor_from_a_python_number_per_batch(monkeypatch):
    """On CUDA each such tensor is a blocking host-to-device copy; the image count stays on the host."""
    from engine import evaluate
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(5)]
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, 'tensor', lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    stats = evaluate(batches, model, torch.device('cpu'), print_freq=100)
    assert len(made) <= 1  # once, for the all-reduce at the end
    logits = torch.cat([model(x) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == targets).double().mean().item())
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_the_compile_probe_reports_a_device_it_cannot_compile_for():
    import speedups
    assert 'NVIDIA' in speedups.compiler_problem('cuda')  # the CPU compiles, the missing GPU does not


def test_compile_or_eager_probes_the_device_that_holds_the_model(monkeypatch):
    import speedups
    probed = []
    monkeypatch.setattr(speedups, 'compiler_problem', lambda device_type: probed.append(device_type) or 'broken')
    model = torch.nn.Linear(2, 2, device='meta')  # stands for a model moved to the GPU
    assert speedups.compile_or_eager(model, 'student') is model
    assert probed == ['meta']


def test_local_rank_beyond_the_visible_gpus_is_one_error_line(monkeypatch):
    import argparse
    import utils
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    for name, value in (('RANK', '1'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '1')):
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(device=torch.device('cuda'), dist_url='env://')
    with pytest.raises(utils.UserError, match='LOCAL_RANK 1 but this process sees 1 GPU'):
        utils.init_distributed_mode(args)
    assert not utils.is_dist_avail_and_initialized()


def single_rank_group() -> None:
    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)


def test_ddp_keeps_gradients_in_its_buckets():
    import main
    single_rank_group()
    try:
        model = main.distributed_model(torch.nn.Linear(2, 2), torch.device('cpu'), gpu=0)
        assert model.gradient_as_bucket_view
    finally:
        torch.distributed.destroy_process_group()


def test_a_submitit_task_leaves_the_process_group_however_main_ends(monkeypatch, tmp_path):
    import run_with_submitit
    args = run_with_submitit.parse_args(['--output_dir', str(tmp_path)])
    monkeypatch.setattr(run_with_submitit.Trainer, '_setup_distributed', staticmethod(lambda args: single_rank_group()))
    for outcome in (lambda args: None, lambda args: 1 / 0):
        monkeypatch.setattr(run_with_submitit.trainer, 'main', outcome)
        try:
            run_with_submitit.Trainer(args)()
        except ZeroDivisionError:
            pass
        assert not torch.distributed.is_initialized()
