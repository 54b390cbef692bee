"""The precision a run picks (precision.py): bf16 where it is native and faster, fp16 on a GPU without bf16,
fp32 elsewhere and with --no-amp."""
import re

import pytest
import timm
import torch
import yaml

import main
import precision
import speedups
from conftest import FAST, run_cli, twin_vits_and_batches
from engine import LossScaler, TrainOptions, train_one_epoch
from losses import DistillationLoss
from precision import resolve_precision

CPU, CUDA = torch.device('cpu'), torch.device('cuda')


def fails(*args, **kwargs):
    raise AssertionError('the probe must not run')


@pytest.mark.parametrize('speedup, expected', [(4.2, torch.bfloat16), (1.5, torch.bfloat16), (1.49, None), (0.6, None),
                                               (0.014, None)])
def test_a_cpu_defaults_to_bf16_only_where_the_probe_measures_it_at_least_1_5x_faster(speedup, expected):
    chosen = resolve_precision(None, None, CPU, cpu_speedup=lambda: speedup)
    assert chosen.dtype == expected
    assert f' {speedup}x as fast' in chosen.reason  # 0.014x, not a rounded 0.0x


def test_a_gpu_defaults_to_bf16_where_native_and_fp16_where_bf16_would_be_emulated(monkeypatch):
    volta = lambda including_emulation=True: including_emulation  # noqa: E731  (torch's answer on a V100)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', volta)
    assert resolve_precision(None, None, CUDA, cpu_speedup=fails).dtype == torch.float16
    assert resolve_precision(True, None, CUDA, cpu_speedup=fails).dtype == torch.float16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # A100, H100
    assert resolve_precision(None, None, CUDA, cpu_speedup=fails).dtype == torch.bfloat16


def test_explicit_flags_win_over_the_probe():
    slow, fast = (lambda: 0.5), (lambda: 4.0)
    assert resolve_precision(False, None, CPU, cpu_speedup=fails).dtype is None  # --no-amp
    assert resolve_precision(False, 'bfloat16', CPU, cpu_speedup=fails).dtype is None  # --no-amp --amp-dtype
    assert resolve_precision(True, None, CPU, cpu_speedup=slow).dtype == torch.bfloat16  # --amp
    assert resolve_precision(None, 'float16', CPU, cpu_speedup=fast).dtype == torch.float16  # --amp-dtype
    assert resolve_precision(True, 'float16', CUDA, cpu_speedup=fails).dtype == torch.float16


def test_the_probe_runs_once_per_machine_and_a_cache_that_cannot_be_written_costs_nothing(monkeypatch, tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return 3.0
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert precision.cpu_bf16_speedup(measure) == 3.0
    assert precision.cpu_bf16_speedup(measure) == 3.0
    assert len(calls) == 1 and precision.cache_path().is_file()
    blocked = tmp_path / 'a-file'
    blocked.write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(blocked))  # ~/.cache/deit cannot be created
    assert precision.cpu_bf16_speedup(measure) == 3.0 and len(calls) == 2


def test_the_probe_measures_a_positive_speedup():
    assert precision.measure_cpu_bf16_speedup(n=128, repeats=2) > 0


def test_no_amp_trains_the_plain_fp32_step_bit_for_bit_without_entering_autocast(monkeypatch):
    args = main.get_args_parser().parse_args(['--no-amp', '--device', 'cpu', '--print-freq', '1'])
    chosen = main.choose_precision(args.amp, args.amp_dtype, CPU, distributed=False)
    assert chosen.dtype is None
    monkeypatch.setattr(torch, 'autocast', fails)
    reference, model, batches = twin_vits_and_batches(steps=3)
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for images, targets, _ in batches:  # the fp32 step written out
        plain.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(images), targets).backward()
        plain.step()
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    train_one_epoch(model, criterion, batches, torch.optim.AdamW(model.parameters(), lr=1e-3), CPU, 0,
                    LossScaler(False, 'cpu'), TrainOptions(amp_dtype=chosen.dtype, print_freq=args.print_freq))
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


def test_cpu_bf16_unfuses_timms_attention_with_the_same_logits_while_fp32_and_gpus_keep_the_fused_kernel():
    reference, model, batches = twin_vits_and_batches(steps=1)
    images = batches[0][0]
    layers = [m for m in model.modules() if hasattr(m, 'fused_attn')]
    assert speedups.unfuse_cpu_bf16_attention(model, CPU, None) == 0  # fp32: the fused kernel, bit for bit
    assert speedups.unfuse_cpu_bf16_attention(model, CUDA, torch.bfloat16) == 0
    assert layers and all(layer.fused_attn for layer in layers)
    assert speedups.unfuse_cpu_bf16_attention(model, CPU, torch.bfloat16) == len(layers)
    assert not any(layer.fused_attn for layer in layers)
    with torch.no_grad():
        exact = reference(images)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            fused, unfused = reference(images).float(), model(images).float()
    # The unfused path is as close to the fp32 logits as the fused kernel is (bf16 rounding, not a change).
    assert (unfused - exact).abs().max() <= 2 * (fused - exact).abs().max() + 1e-3
    assert (unfused - exact).abs().max() < 0.05 * exact.abs().max()


def test_a_default_run_names_its_precision_for_student_and_teacher_first(imagefolder, teacher_checkpoint, tmp_path,
                                                                        monkeypatch):
    default = [flag for flag in FAST if flag != '--no-amp']
    out = tmp_path / 'run'
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))  # the probe runs: no answer cached
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--no-model-ema',
                   '--distillation-type', 'hard', '--no-distillation-token', '--teacher-model', 'regnety_002',
                   '--teacher-path', teacher_checkpoint, '--output_dir', out, *default)
    student, teacher = [line for line in proc.stdout.splitlines()[:3] if line.startswith('precision:')]
    match = re.fullmatch(r'precision: student (fp32|bf16) \(default: a bf16 matmul runs .*\)', student)
    assert match, student
    assert teacher == f"precision: teacher {match[1]} (the student's)"
    unfused = [line for line in proc.stdout.splitlines() if line.startswith('attention: ')]
    layers = sum(hasattr(m, 'fused_attn') for m in timm.create_model('test_vit').modules())
    assert unfused == ([f"attention: {layers} layers unfused (torch's fused CPU attention is slow in bf16)"]
                       if match[1] == 'bf16' else [])
    saved = yaml.safe_load((out / 'args.yaml').read_text())  # repeating the run repeats the precision
    assert (saved['amp'], saved['amp_dtype']) == ((True, 'bfloat16') if match[1] == 'bf16' else (False, None))


def test_teacher_agreement_tool_compares_bf16_hard_labels_with_fp32_ones(imagefolder, teacher_checkpoint, capsys):
    from tools import teacher_agreement
    assert teacher_agreement.cli(['--data-path', str(imagefolder), '--teacher-model', 'regnety_002', '--teacher-path',
                                  str(teacher_checkpoint), *FAST]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    match = re.fullmatch(r'regnety_002: bfloat16 hard labels equal the fp32 ones on ([\d.]+)% of 24 validation '
                         r'images \(top-1: fp32 [\d.]+%, bfloat16 [\d.]+%\)', line)
    assert match, line
    assert 50 <= float(match[1]) <= 100  # a handful of near-ties may flip, not the teacher's answers
