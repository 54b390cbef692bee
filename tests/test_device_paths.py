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


def test_compile_compiles_the_evaluation_of_a_distilled_student(imagefolder, tmp_path, monkeypatch):
    """Its evaluation reads each head (engine.HeadLogits), which the training module does not return:
    --compile must compile that too, not run it eagerly beside the compiled student."""
    import functools
    import timm
    import main
    import speedups
    from conftest import FAST, run_cli
    from tools.gpu_check import counting_backend
    evaluating, calls = [False], []
    backend = counting_backend('eager', lambda kind: kind == 'call' and calls.append(evaluating[0]))

    def evaluate(*args, **kwargs):
        evaluating[0] = True
        try:
            return main_evaluate(*args, **kwargs)
        finally:
            evaluating[0] = False
    main_evaluate = main.evaluate
    monkeypatch.setattr(main, 'evaluate', evaluate)
    monkeypatch.setattr(speedups, 'compiler_problem', lambda device_type: '')
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=backend))  # dynamo, no codegen
    teacher = tmp_path / 'teacher.pth'
    torch.save({'model': timm.create_model('test_resnet', num_classes=3).state_dict()}, teacher)
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_micro_distilled_patch4_16', '--epochs', '1',
                   '--distillation-type', 'hard', '--teacher-model', 'test_resnet', '--teacher-path', teacher,
                   '--no-model-ema', '--compile', *FAST, '--input-size', '16')
    assert 'Acc@1 per head' in proc.stdout  # the evaluation still reads both heads
    assert any(calls)  # the evaluation ran compiled graphs
    assert not all(calls)  # and so did training


def test_a_step_checkpoint_holds_the_metric_sums_of_all_ranks_and_only_rank_0_restores_them(monkeypatch):
    """Resumed mid-epoch on N ranks, the epoch's train_loss must count the steps before the stop once,
    not rank 0's part N times."""
    import engine
    import utils
    from losses import DistillationLoss
    logger = utils.MetricLogger()
    logger.update(loss=torch.tensor(2.0))
    logger.update(loss=torch.tensor(4.0))
    with monkeypatch.context() as m:  # a second rank that trained the same
        m.setattr(utils, 'is_dist_avail_and_initialized', lambda: True)
        m.setattr(utils, 'all_reduce_sum', lambda tensor: tensor * 2)
        assert logger.summed_state_dict(torch.device('cpu')) == {'sums': {'loss': 12.0}, 'counts': {'loss': 4}}

    saved = {'sums': {'loss': 1000.0, 'lr': 0.4}, 'counts': {'loss': 4, 'lr': 4}}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(2)]
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.0, 1.0)

    def epoch_loss(rank: int) -> float:
        monkeypatch.setattr(engine, 'get_rank', lambda: rank)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return engine.train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0,
                                      engine.LossScaler(False, 'cpu'), engine.TrainOptions(print_freq=10),
                                      start_step=4, metrics_state=saved)['loss']
    assert epoch_loss(rank=0) > 100  # the saved sums, counted here
    assert epoch_loss(rank=1) < 10  # and not again on rank 1


def test_unreadable_images_are_counted_over_all_ranks_once_each(monkeypatch):
    import utils
    monkeypatch.setattr(utils, 'is_dist_avail_and_initialized', lambda: True)
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    other_rank = ['b.jpg (truncated)', 'c.jpg (truncated)']  # with repeated augmentation ranks draw the same image
    monkeypatch.setattr(utils.dist, 'all_gather_object', lambda out, local: out.__setitem__(slice(None), [local, other_rank]))
    assert utils.count_over_ranks({'a.jpg (truncated)': None, 'b.jpg (truncated)': None}) == 3


def test_device_cuda_n_in_one_process_makes_gpu_n_the_current_device(monkeypatch):
    """Else CUDA's context is made on GPU 0 and its properties (bf16 support) are read from there."""
    import argparse
    import utils
    chosen = []
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    args = argparse.Namespace(device=torch.device('cuda', 1))
    utils.init_distributed_mode(args)
    assert chosen == [1] and args.gpu == 1 and not args.distributed
    utils.init_distributed_mode(argparse.Namespace(device=torch.device('cpu')))
    assert chosen == [1]


@pytest.mark.parametrize('capability, native', [((7, 0), False), ((8, 0), True)])
def test_bf16_on_a_gpu_without_native_bf16_says_it_is_emulated(monkeypatch, capability, native):
    from precision import resolve_precision
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla V100' if not native else 'A100')
    cuda = torch.device('cuda')
    chosen = resolve_precision(None, 'bfloat16', cuda)
    assert chosen.dtype == torch.bfloat16  # what was asked for
    if native:
        assert chosen.warning == ''
    else:
        assert 'Tesla V100 (compute capability 7.0)' in chosen.warning and '--amp-dtype float16' in chosen.warning
    assert resolve_precision(None, 'float16', cuda).warning == ''
    assert resolve_precision(None, 'bfloat16', torch.device('cpu')).warning == ''


def test_freed_memory_is_kept_only_by_a_cpu_trainer_and_not_by_its_data_workers(monkeypatch):
    import checkpoint
    import main
    import speedups
    calls = []
    monkeypatch.setattr(speedups, 'keep_freed_memory', lambda keep=True: calls.append(keep) or True)
    assert not speedups.keep_freed_memory_for(torch.device('cuda')) and calls == []
    assert speedups.keep_freed_memory_for(torch.device('cpu')) and calls == [True]
    monkeypatch.setattr(speedups, '_kept', True)  # what the trainer's keep_freed_memory left to a forked worker
    monkeypatch.setattr(checkpoint, 'ignore_stop_signals', lambda worker_id: None)  # not in this process
    main.init_data_worker(0)
    assert calls == [True, False]
