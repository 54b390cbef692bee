"""The fast paths compute what the reference computes: crops, eval pixels, erasing, teacher logits, losses.

Speed itself is measured by benchmark.py, not by tests.
"""
import contextlib
import copy
import functools
import json
import random
import re
import shutil
import statistics

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import AugmentOp
from timm.data.random_erasing import RandomErasing
from timm.optim import create_optimizer_v2

import benchmark
import fast_augment
import fast_data
import main
import speedups
from conftest import FAST, run_cli, twin_vits_and_batches
from datasets import UNREADABLE_IMAGE_ERRORS, DataSettings, TransformSettings, build_pipeline, build_transform
from engine import LossScaler, TrainOptions, train_one_epoch
from losses import DistillationLoss
from seeding import preserved_cpu_generators, seed_cpu_generators
from teacher import fold_batchnorm, prepare_teacher


def parse(*argv):
    return main.get_args_parser().parse_args([str(a) for a in argv])


def transform_settings(*argv) -> TransformSettings:
    return DataSettings.from_args(parse(*argv)).transform


@contextlib.contextmanager
def seeded(seed: int):
    """The generators seeded as RobustSamples seeds a sample, restored after the block."""
    with preserved_cpu_generators():
        seed_cpu_generators(seed)
        yield


def ramp_jpeg(path, width: int, height: int):
    """Red grows with x, green with y: a crop's extent can be read back from its pixels."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def box_from_pixels(image: torch.Tensor, width: int, height: int):
    """(left, top, right, bottom) in source pixels, from the red / green ramps of an HWC uint8 crop
    (min / max, so a horizontal flip does not matter)."""
    red, green = image[..., 0].float(), image[..., 1].float()
    return (red.min() / 255 * width, green.min() / 255 * height, red.max() / 255 * width, green.max() / 255 * height)


def reference_uint8(transform, img) -> torch.Tensor:
    """The reference (timm) output brought back to HWC uint8 levels."""
    normalize = next(t for t in transform.transforms if type(t).__name__ == 'Normalize')
    mean, std = torch.as_tensor(normalize.mean)[:, None, None], torch.as_tensor(normalize.std)[:, None, None]
    return (transform(img) * std + mean).mul(255).permute(1, 2, 0)


def test_fast_train_crops_match_the_reference_sample_by_sample_and_in_distribution(tmp_path, monkeypatch):
    width, height = 640, 480  # at 112 px, crops of >= 224 px are decoded at half or quarter scale
    path = ramp_jpeg(tmp_path / 'ramp.jpg', width, height)
    settings = transform_settings('--input-size', 112, '--aa', 'none', '--reprob', 0, '--color-jitter', 0)
    reference = build_transform(True, settings)
    fast = build_pipeline(True, settings).transform
    factors = []
    decode = fast_data.decode
    monkeypatch.setattr(fast_data, 'decode', lambda *a: (lambda out: factors.append(out[1]) or out)(decode(*a)))

    scales, ref_scales, errors = [], [], []
    for k in range(160):
        with seeded(k):
            ref_box = box_from_pixels(reference_uint8(reference, Image.open(path).convert('RGB')), width, height)
        with seeded(k):
            box = box_from_pixels(fast(fast_data.open_lazily(path)), width, height)
        errors.append(max(abs(float(a - b)) for a, b in zip(box, ref_box)))
        scales.append(float((box[2] - box[0]) * (box[3] - box[1])) / (width * height))
        ref_scales.append(float((ref_box[2] - ref_box[0]) * (ref_box[3] - ref_box[1])) / (width * height))

    assert sum(f > 1 for f in factors) > 30, 'the reduced-scale decoding path was not exercised'
    assert statistics.median(errors) < 2 and max(errors) < 8, max(errors)  # source pixels
    assert statistics.mean(scales) == pytest.approx(statistics.mean(ref_scales), abs=0.01)
    for q in (0.1, 0.5, 0.9):
        assert np.quantile(scales, q) == pytest.approx(np.quantile(ref_scales, q), abs=0.02)
    # and the distribution is RandomResizedCrop's: area fraction uniform in [0.08, 1] (clipped by the frame)
    assert 0.4 < statistics.mean(scales) < 0.6 and min(scales) > 0.06


@pytest.mark.parametrize('size', [(500, 375), (375, 500), (301, 257), (1200, 900)])
def test_fast_eval_is_resize_then_center_crop(tmp_path, size):
    rng = np.random.default_rng(0)
    path = tmp_path / 'photo.jpg'
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).resize(size).save(path)
    settings = transform_settings('--input-size', 224)
    expected = reference_uint8(build_transform(False, settings).transform, Image.open(path).convert('RGB'))
    ours = fast_data.FastEvalTransform(224)(fast_data.open_lazily(path)).float()
    assert ours.shape == (224, 224, 3)
    if max(size) < 1000:  # full-scale decoding: the same pixels (rounding of the float box aside)
        assert (ours - expected).abs().max() <= 1.01
    else:  # decoded at half scale: the DCT's downscale instead of bicubic's, on noise
        assert (ours - expected).abs().mean() < 12


def test_full_scale_decode_has_pils_pixels_in_channels_last_and_a_broken_jpeg_is_unreadable(tmp_path):
    path = tmp_path / 'photo.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
    pixels, factor = fast_data.decode(fast_data.open_lazily(path), (0, 0, 400, 300), (224, 224))
    assert factor == 1 and pixels.shape == (1, 3, 375, 500)
    assert pixels.is_contiguous(memory_format=torch.channels_last)  # what the fast uint8 resize needs
    assert torch.equal(fast_data.to_hwc(pixels), torch.from_numpy(np.array(Image.open(path).convert('RGB'))))

    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(path.read_bytes()[:20000])  # header intact, scan data cut
    with pytest.raises(UNREADABLE_IMAGE_ERRORS, match='cannot decode JPEG'):
        fast_data.decode(fast_data.open_lazily(broken), (0, 0, 400, 300), (224, 224))


def test_open_lazily_reads_colour_jpeg_headers_and_leaves_other_files_to_pil(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (375, 501, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, 'camera'  # rotated 90 degrees, by a camera: an APP1 segment before the frame
    files = {'baseline.jpg': dict(quality=90), 'progressive.jpg': dict(quality=90, progressive=True),
             'exif.jpg': dict(quality=90, exif=exif),
             'grey.jpg': dict(mode='L'), 'cmyk.jpg': dict(mode='CMYK'), 'photo.png': dict()}
    for name, options in files.items():
        mode = options.pop('mode', 'RGB')
        Image.fromarray(pixels).convert(mode).save(tmp_path / name, **options)
    for name in files:
        img = fast_data.open_lazily(tmp_path / name)
        assert isinstance(img, fast_data.JpegFile) == (name in ('baseline.jpg', 'progressive.jpg', 'exif.jpg'))
        assert tuple(img.size) == (501, 375)
        expected = np.array(Image.open(tmp_path / name).convert('RGB'))  # PIL's pixels, no EXIF rotation
        decoded, factor = fast_data.decode(img, (0, 0, 501, 375), (501, 375))
        assert factor == 1 and np.array_equal(fast_data.to_hwc(decoded).numpy(), expected), name

    # A crop that keeps the output's pixels at a quarter scale is decoded there: PIL's draft pixels.
    decoded, factor = fast_data.decode(fast_data.open_lazily(tmp_path / 'baseline.jpg'), (0, 0, 501, 375), (120, 90))
    draft = Image.open(tmp_path / 'baseline.jpg')
    draft.draft('RGB', (501 // 4, 375 // 4))
    assert factor == 4 and np.array_equal(fast_data.to_hwc(decoded).numpy(), np.array(draft.convert('RGB')))

    (tmp_path / 'notes.jpg').write_bytes(b'not an image')
    with pytest.raises(UNREADABLE_IMAGE_ERRORS):
        fast_data.open_lazily(tmp_path / 'notes.jpg')


def photo_like(seed: int, size: int = 224) -> np.ndarray:
    """Smooth colour gradients with pixel noise, levels within [30, 200] (auto-contrast has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    pixels = 115 + 70 * np.stack(channels, axis=-1) + rng.normal(0, 8, (size, size, 3))
    return pixels.clip(30, 200).astype(np.uint8)


TABLE_OPS = {'AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal',
             'Solarize', 'SolarizeIncreasing', 'SolarizeAdd'}
GEOMETRIC_OPS = {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel'}


@pytest.mark.parametrize('name', sorted(fast_augment.ARRAY_OPS))
def test_array_augment_ops_compute_what_timms_pil_ops_compute(name):
    hparams = dict(translate_const=100, img_mean=(124, 116, 104), interpolation=Image.Resampling.BICUBIC,
                   magnitude_std=0.5)
    for magnitude in (5, 10):  # PosterizeIncreasing keeps 0 bits at 10
        op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
        ours = fast_augment.on_arrays(op)
        for seed in range(3):
            img = photo_like(seed)
            random.seed(seed)
            expected = np.asarray(op(Image.fromarray(img)), dtype=np.int16)
            random.seed(seed)  # the same magnitude noise and sign
            diff = np.abs(ours(img).astype(np.int16) - expected)
            if name in TABLE_OPS:
                assert diff.max() == 0
            elif name in GEOMETRIC_OPS:  # the same source points; another bicubic, and a soft edge to the fill
                assert diff.mean() < 1.5 and (diff > 8).mean() < 0.02, (diff.mean(), (diff > 8).mean())
            else:  # blends: rounded instead of truncated, OpenCV's grey
                assert diff.max() <= 2


def test_fast_train_transform_makes_timms_flip_and_randaugment_draws(tmp_path):
    """Sample by sample, the same seed picks the same crop, flip, ops and magnitudes as timm's pipeline."""
    path = tmp_path / 'photo.jpg'
    Image.fromarray(photo_like(0, 320)).save(path, quality=95)
    settings = transform_settings('--input-size', 96, '--reprob', 0)  # timm's default policy, rand-m9-mstd0.5-inc1
    reference = build_transform(True, settings)
    fast = build_pipeline(True, settings).transform
    draws = {'reference': [], 'fast': []}

    def record(log, op):
        fn = op.aug_fn
        op.aug_fn = lambda img, *level, **kwargs: log.append((op.name, level)) or fn(img, *level, **kwargs)
    for op in next(t for t in reference.transforms if type(t).__name__ == 'RandAugment').ops:
        record(draws['reference'], op)
    for op in next(t for t in fast.steps if type(t).__name__ == 'RandAugment').ops:
        record(draws['fast'], op)

    differences = []
    for k in range(60):
        with seeded(k):
            expected = reference_uint8(reference, Image.open(path).convert('RGB'))
        with seeded(k):
            ours = fast(fast_data.open_lazily(path)).float()
        differences.append(float((ours - expected).abs().mean()))
    assert len(draws['fast']) > 40 and draws['fast'] == draws['reference']
    # same crop, flip and ops: the pixels differ only by the resampling kernels' rounding and edges
    assert statistics.median(differences) < 1.5 and max(differences) < 6, max(differences)


def test_a_step_without_an_array_version_runs_on_pil(tmp_path):
    path = tmp_path / 'photo.jpg'
    Image.fromarray(photo_like(1, 320)).save(path, quality=95)
    # without RandAugment timm adds ColorJitter, a step without an array version
    settings = transform_settings('--input-size', 96, '--reprob', 0, '--aa', 'none', '--color-jitter', 0.4)
    reference = build_transform(True, settings)
    fast = build_pipeline(True, settings).transform
    assert [type(step).__name__ for step in fast.steps] == ['HorizontalFlip', 'OnPIL']
    for k in range(5):
        with seeded(k):
            expected = reference_uint8(reference, Image.open(path).convert('RGB'))
        with seeded(k):
            ours = fast(fast_data.open_lazily(path))
        assert ours.dtype == torch.uint8 and (ours.float() - expected).abs().mean() < 1.5  # the same jitter draws


def test_device_batches_normalise_like_totensor_normalize_and_keep_channels_last():
    stage = build_pipeline(True, transform_settings('--input-size', 48, '--reprob', 0)).batch
    images = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader([(img, 0, []) for img in images], batch_size=4,
                                         collate_fn=lambda b: (torch.stack([x[0] for x in b]), torch.tensor([0] * 4), []))
    batch = next(iter(fast_data.DeviceBatches(loader, stage, torch.device('cpu'))))[0]
    reference = torch.stack([(img.permute(2, 0, 1) / 255 - torch.tensor(stage.mean)[:, None, None])
                             / torch.tensor(stage.std)[:, None, None] for img in images])
    assert torch.allclose(batch, reference, atol=1e-5)
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_batch_erasing_has_timms_distribution():
    erasing = RandomErasing(0.25, mode='pixel', device='cpu')
    random.seed(0)
    torch.manual_seed(0)
    timm_erased = erasing(torch.zeros(3000, 1, 24, 24)).ne(0).float().mean(dim=(1, 2, 3))
    ours = fast_data.erase_(torch.zeros(3000, 1, 24, 24), erasing, random.Random(1), torch.Generator().manual_seed(1))
    ours_erased = ours.ne(0).float().mean(dim=(1, 2, 3))
    # plain floats: pytest.approx does not take tensors (pytest 9.2 iterates a 0-d tensor and fails)
    assert ours_erased.gt(0).float().mean().item() == pytest.approx(timm_erased.gt(0).float().mean().item(), abs=0.03)
    assert ours_erased[ours_erased > 0].mean().item() == pytest.approx(timm_erased[timm_erased > 0].mean().item(),
                                                                       abs=0.015)


class _Sampler(list):
    """A resumable sampler's state (epoch, start) over a fixed order, as main.py's ResumableSampler."""
    epoch, start = 3, 0

    def __iter__(self):
        return iter(self[self.start:])


def test_batch_erasing_is_the_same_for_a_resumed_step():
    stage = build_pipeline(True, transform_settings('--input-size', 40, '--reprob', 1.0)).batch
    data = torch.full((12, 40, 40, 3), 128, dtype=torch.uint8)
    sampler = _Sampler(range(12))

    def batches(start):
        sampler.start = start
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler,
                                             collate_fn=lambda b: (torch.stack(b), torch.zeros(4), []))
        return [b[0] for b in fast_data.DeviceBatches(loader, stage, torch.device('cpu'), seed=5)]

    whole, resumed = batches(0), batches(8)
    assert torch.equal(whole[2], resumed[0])  # step 2 erased the same, resumed or not
    assert not torch.equal(whole[0], whole[1])  # and each step differently


@pytest.mark.parametrize('argv, fast_train, fast_eval', [
    ((), True, True),
    (('--train-interpolation', 'random'), True, True),  # bilinear or bicubic per image: both in torch's resize
    (('--train-interpolation', 'nearest'), False, True),  # a filter torch's uint8 resize does not do as PIL
    (('--ThreeAugment',), False, True),
    (('--input-size', 32), False, False),  # the padded crop; evaluated without resizing
    (('--no-fast-data',), False, False),
])
def test_the_fast_pipeline_stands_in_only_where_it_implements_the_reference(argv, fast_train, fast_eval):
    settings = transform_settings('--input-size', 64, *argv)
    for is_train, fast, fast_type in ((True, fast_train, fast_data.FastTrainTransform),
                                      (False, fast_eval, fast_data.FastEvalTransform)):
        pipeline = build_pipeline(is_train, settings)
        assert isinstance(pipeline.transform, fast_type) == fast and (pipeline.batch is not None) == fast
        assert (pipeline.open_image is fast_data.open_lazily) == fast  # only the fast path decodes in its transform
        if not fast:  # the reference itself
            assert type(pipeline.transform) is type(build_transform(is_train, settings))


def test_the_fast_batch_stage_erases_as_the_reference_and_normalises_with_its_constants():
    settings = transform_settings('--input-size', 64, '--reprob', 0.5, '--remode', 'const', '--recount', 3)
    reference = build_transform(True, settings).transforms
    stage = build_pipeline(True, settings).batch
    normalize = next(t for t in reference if type(t).__name__ == 'Normalize')
    assert torch.equal(torch.tensor(stage.mean), normalize.mean) and torch.equal(torch.tensor(stage.std), normalize.std)
    assert vars(stage.erasing) == vars(next(t for t in reference if isinstance(t, RandomErasing)))
    assert build_pipeline(True, transform_settings('--input-size', 64, '--reprob', 0)).batch.erasing is None


def test_main_trains_and_evaluates_with_fast_data(imagefolder, tmp_path, monkeypatch):
    normalised = []  # (loader, shape) of each batch that the fast path's batch stage received
    normalise = fast_data.DeviceBatches.normalise
    monkeypatch.setattr(fast_data.DeviceBatches, 'normalise',
                        lambda loader, images: normalised.append((id(loader), tuple(images.shape))) or
                        normalise(loader, images))
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--no-model-ema',
                   '--output_dir', tmp_path, *FAST, '--input-size', '48', '--num_workers', '1')
    assert '(24 images)' in proc.stdout
    assert json.loads((tmp_path / 'log.txt').read_text())['train_loss'] > 0
    assert len({loader for loader, _ in normalised}) == 2  # training and validation both took the fast path
    assert normalised[0][1] == (12, 48, 48, 3)  # uint8 NHWC crops from the fast transform


def random_batchnorm(model):
    """Non-trivial running statistics, as a trained teacher has."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def test_teacher_logits_equal_the_eager_teacher():
    torch.manual_seed(0)
    eager = random_batchnorm(timm.create_model('regnety_002', num_classes=10))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in eager.modules())
    fast = prepare_teacher(copy.deepcopy(eager), torch.device('cpu'))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # all folded
    assert fold_batchnorm(random_batchnorm(timm.create_model('regnety_002'))) == norms
    assert not any(p.requires_grad for p in fast.parameters())
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = eager(images)
    got = fast.train()(images)  # train() cannot switch the folded teacher back to batch statistics
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_bf16_teacher_on_a_cpu_gives_fp32_logits_close_to_the_fp32_teachers():
    cpu = torch.device('cpu')
    torch.manual_seed(0)
    eager = random_batchnorm(timm.create_model('regnety_002', num_classes=10))
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        expected = eager(images)
    fast = prepare_teacher(copy.deepcopy(eager), cpu, amp_dtype=torch.bfloat16)
    calls = []
    fast.model.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    got = fast(images)
    assert calls == [torch.bfloat16] and got.dtype == torch.float32
    assert (got - expected).abs().max() <= 5e-2 * expected.abs().max()  # bf16 keeps ~3 significant digits
    assert (got - expected).abs().max() > 0  # really another precision


def test_inference_teacher_output_enters_the_soft_distillation_loss():
    teacher = prepare_teacher(random_batchnorm(timm.create_model('regnety_002', num_classes=10)), torch.device('cpu'))
    student = torch.nn.Linear(3 * 32 * 32, 10)
    images = torch.randn(2, 3, 32, 32)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'soft', 0.5, 2.0, distillation_token=False)
    loss(images, student(images.flatten(1)), torch.tensor([1, 2])).backward()
    assert student.weight.grad is not None


def run_steps(model, optimizer, batches):
    """Losses of engine.train_one_epoch, one step per batch (progress printing at every step)."""
    losses = []
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    for step, batch in enumerate(batches):
        stats = train_one_epoch(model, criterion, [batch], optimizer, torch.device('cpu'), 0,
                                LossScaler(False, 'cpu'), TrainOptions(print_freq=1, seed=0), start_step=step)
        losses.append(stats['loss'])
    return losses


@pytest.mark.parametrize('compiled', [False, True])
def test_optimised_training_step_gives_the_same_loss_curve(monkeypatch, compiled):
    reference, model, batches = twin_vits_and_batches(steps=4)
    plain = create_optimizer_v2(reference, 'adamw', lr=1e-3, weight_decay=0.05, foreach=False)
    fused = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05,
                                **speedups.optimizer_kwargs(torch.device('cpu')))
    assert fused.defaults.get('fused') and not plain.defaults.get('fused')
    if compiled:
        # graph capture and AOT autograd as --compile does, without the C++ build (minutes on 2 cores)
        monkeypatch.setattr(speedups, 'compiler_problem', lambda device_type: '')
        monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
        model = speedups.compile_or_eager(model, 'student')
    expected, got = run_steps(reference, plain, batches), run_steps(model, fused, batches)
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected[-1] != expected[0]


def test_compile_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(speedups, 'compiler_problem',
                        lambda device_type: 'InvalidCxxCompiler: No working C++ compiler found')
    model = torch.nn.Linear(2, 2)
    assert speedups.compile_or_eager(model, 'student') is model
    assert capsys.readouterr().out.count('\n') == 1


def run_benchmark(out, capsys, *argv) -> tuple:
    """benchmark.py's cli in this process (its memory probes start processes of their own), its JSON report
    written to ``out``: the report and what it printed. Its allocator setting is put back afterwards."""
    try:
        assert benchmark.cli([*argv, '--json', str(out)]) == 0
    finally:
        speedups.keep_freed_memory(False)
    return json.loads(out.read_text()), capsys.readouterr().out


def test_benchmark_quick_writes_the_table_the_bf16_breakdown_and_json(tmp_path, capsys):
    report, stdout = run_benchmark(tmp_path / 'bench.json', capsys, '--quick', '--breakdown', '--amp-dtype',
                                   'bfloat16', '--teacher-input-size', '80')
    names = [r['name'] for r in report['rows']]
    assert [n.split(':')[0] for n in names] == ['data', 'data', 'train step', 'distill step', 'teacher @80', 'eval',
                                                'teacher forward']
    assert report['matmul_gflops'] > 0 and all(r['ratio'] > 0 and r['peak_rss_mib'] > 0 for r in report['rows'])
    assert report['bf16_matmul_gflops'] > 0 and report['ours_dtype'] == 'bfloat16'
    train = report['rows'][2]  # ours against the bf16 rate, the fp32 baseline against the fp32 one
    assert train['ours_of_limit'] == pytest.approx(train['ours'] * train['gflop_per_image'] / train['bf16_matmul_gflops'])
    assert train['baseline_of_limit'] == pytest.approx(train['baseline'] * train['gflop_per_image'] /
                                                       train['matmul_gflops'])
    assert 'ratio' in stdout and re.search(r'matmul \(256\^2, \d threads\): fp32 \d+ GFLOP/s, bf16 \d+', stdout)

    # Every stage was reached where the pipeline calls it, and the stages (disjoint calls) fit in the pass.
    stages = report['breakdown']['train pipeline']
    assert list(stages['stock'])[:2] == ['decode (PIL)', 'RandomResizedCropAndInterpolation']
    assert {'RandAugment', 'RandomErasing', 'other', 'total'} <= set(stages['stock'])
    assert list(stages['fast'])[:3] == ['open (header)', 'crop box', 'decode']
    assert {'resize', 'HorizontalFlip', 'RandAugment', 'normalise (batch)', 'erase (batch)'} <= set(stages['fast'])
    for ms in stages.values():
        assert all(value > 0 for value in ms.values())
        assert sum(ms.values()) == pytest.approx(2 * ms['total'])
    step = report['breakdown']['train step']
    assert step['dtype'] == 'bfloat16'
    assert all(step['share'][group] > 0 for group in ('matmul', 'attention', 'elementwise', 'casts', 'optimizer'))
    assert sum(step['share'].values()) == pytest.approx(1)
    assert step['gflops']['matmul'] > 0 and step['gflops']['attention'] > 0
    assert stdout.count('at most') == 3


def test_benchmark_shards_section_counts_opens_startup_memory_and_throughput(tmp_path, capsys):
    report, stdout = run_benchmark(tmp_path / 'bench.json', capsys, '--quick', '--sections', 'shards')
    shards, images = report['shards'], report['settings']['images']
    assert report['rows'] == [] and 1 < shards['shards'] < images
    assert set(shards['images_per_s']) == {'folder', 'shards', 'shards --max-side 320'}
    assert all(rate > 0 for rate in shards['images_per_s'].values())
    assert all(shards['startup'][name]['warm_s'] > 0 for name in ('folder scan', 'shard set'))
    memory = shards['worker_memory']
    assert memory['shards'] == report['settings']['set_shards'] - 1 and memory['ms_per_shard'] > 0
    assert 'data at scale' in stdout and 'start-up, warm cache' in stdout
    if shutil.which('strace'):  # opens and stats on the data, counted by strace
        calls = shards['syscalls']
        assert calls['folder']['epoch']['opens'] == images  # one open per image
        assert calls['shards']['epoch'] == {'opens': shards['shards'], 'stats': 0}  # one open per shard (1 worker)
        assert calls['folder scan']['start-up']['opens'] > 100  # a listing of each of its 100 class folders
        assert calls['shard set']['start-up']['opens'] < report['settings']['set_shards']  # no shard opened
    else:
        assert shards['syscalls'] is None and 'strace not found' in stdout


def test_benchmark_counts_the_attention_kernels_flops():
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    forward = 2 * (2 * 2 * 3 * 5 * 5 * 4)  # q @ k^T and scores @ v: 2 FLOPs per multiply-add
    assert benchmark.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
    # torch's formula for the CUDA kernels' backward: the scores recomputed, then four matmuls
    backward = benchmark.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) - forward
    assert backward == 5 * forward // 2


def test_benchmark_memory_section_shows_what_grad_checkpointing_saves(tmp_path, capsys):
    report, stdout = run_benchmark(tmp_path / 'bench.json', capsys, '--sections', 'memory', '--model',
                                   'deit_tiny_patch4_32', '--input-size', '32', '--batch-size', '16',
                                   '--amp-dtype', 'float32')  # no precision probe: nothing here runs in it
    memory = report['memory']
    assert memory['plain'] > 0 and memory['checkpointing'] < 0.6 * memory['plain']
    assert 'with --grad-checkpointing' in stdout
