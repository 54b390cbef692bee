"""timm's pretrained weights by name (the hub cache, no network), each model fed the inputs it was trained
on (the teacher's own normalisation and size), and layer-wise lr decay."""
import argparse
import json

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.optim import param_groups_layer_decay
from timm.scheduler import create_scheduler

import export
import fast_data
import main
from conftest import FAST, assert_one_line_error, run_cli
from teacher import InputSpec, TeacherInputs

HALF = (0.5, 0.5, 0.5)
IMAGENET = InputSpec(32, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def fill_hub_cache(cache, name: str, model: torch.nn.Module) -> None:
    """``model``'s weights where huggingface_hub keeps timm's ``name`` (NAME.tag) once downloaded."""
    repo = cache / f'models--timm--{name}'
    revision = '0' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    (repo / 'snapshots' / revision).mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(repo / 'snapshots' / revision / 'model.safetensors'))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache read offline (HF_HUB_CACHE, HF_HUB_OFFLINE=1 as huggingface_hub read them)."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return cache


# ---------------------------------------------------------------------------------------------
# What the teacher receives
# ---------------------------------------------------------------------------------------------

def test_a_half_normalised_teacher_receives_the_students_pixels_renormalised():
    x = torch.randn(2, 3, 32, 32)
    received = TeacherInputs(IMAGENET, InputSpec(32, HALF, HALF))(x)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(received, (x * std + mean - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_a_288_px_teacher_receives_a_288_px_batch_and_the_same_inputs_pass_untouched():
    student = InputSpec(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    assert TeacherInputs(student, InputSpec(288, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))(x).shape == (2, 3, 288, 288)
    same = TeacherInputs(student, student)
    assert same.identity and same(x) is x


def test_distillation_from_a_half_normalised_teacher_at_another_size_feeds_it_timms_preprocessing(
        imagefolder, tmp_path, monkeypatch):
    """Acceptance: the run trains, and each batch the teacher received is, within 1e-5, what timm's own
    eval transform for the teacher's pretrained config (0.5/0.5, 160 px, bicubic) makes of the same
    uint8 crops. The teacher's weights are a safetensors file."""
    torch.manual_seed(0)
    weights_file = tmp_path / 'teacher.safetensors'
    safetensors.torch.save_file(timm.create_model('test_convnext', num_classes=3).state_dict(), str(weights_file))
    crops, received = [], []
    normalise, convert = fast_data.DeviceBatches.normalise, TeacherInputs.forward
    monkeypatch.setattr(fast_data.DeviceBatches, 'normalise', lambda self, images: (
        crops.append(images.clone()), normalise(self, images))[1])
    monkeypatch.setattr(TeacherInputs, 'forward', lambda self, images: (
        received.append(convert(self, images).clone()), received[-1])[1])
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--output_dir', tmp_path / 'out',
                   '--distillation-type', 'soft', '--no-distillation-token', '--teacher-model', 'test_convnext.r160_in1k',
                   '--teacher-path', weights_file, '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--no-model-ema',
                   *FAST, '--input-size', '48')
    assert ('teacher receives: 160 px (bicubic), mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5)'
            in proc.stdout.splitlines()[3]), proc.stdout[:2000]  # among the run's first lines
    log = [json.loads(line) for line in (tmp_path / 'out' / 'log.txt').read_text().splitlines()]
    assert torch.isfinite(torch.tensor(log[0]['train_loss']))

    config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg('test_convnext.r160_in1k').to_dict())
    timm_eval = create_transform(**{**config, 'crop_pct': 1.0})  # the crop is made: resize and normalise
    assert len(received) == 6  # 72 images / 12, once per step
    for batch, got in zip(crops, received):
        expected = torch.stack([timm_eval(image.permute(2, 0, 1).float() / 255) for image in batch])
        assert got.shape == expected.shape == (12, 3, 160, 160)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_teacher_checkpoint_feeds_it_the_size_and_normalisation_its_run_recorded():
    """A teacher fine-tuned here from hub weights (README, "Distil on your own data") records its --input-size
    and the weights' mean/std; an original-script checkpoint records its size only: ImageNet's normalisation."""
    args = argparse.Namespace(teacher_pretrained=False, teacher_model='test_convnext', input_size=32,
                              mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD))
    ours = {'model': {}, 'args': {'input_size': 160, 'mean': list(HALF), 'std': list(HALF)}}
    assert main.teacher_inputs(args, ours) == InputSpec(160, HALF, HALF, 'bicubic')
    original = {'model': {}, 'args': {'input_size': 224}}
    assert main.teacher_inputs(args, original) == InputSpec(224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 'bicubic')
    assert main.teacher_inputs(args, {'model': {}}) == IMAGENET  # records nothing: the student's inputs, as DeiT


# ---------------------------------------------------------------------------------------------
# Hub weights: the teacher, the fine-tuning start, the errors
# ---------------------------------------------------------------------------------------------

def teacher_args(name: str, **kwargs) -> argparse.Namespace:
    args = main.get_args_parser().parse_args(['--distillation-type', 'hard', '--teacher-model', name,
                                              '--teacher-pretrained', '--input-size', '32'])
    args.mean, args.std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    return argparse.Namespace(**{**vars(args), **kwargs})


def test_a_teacher_from_the_hub_cache_has_timms_weights_and_inputs(offline_hub):
    torch.manual_seed(0)
    published = timm.create_model('test_convnext').eval()
    fill_hub_cache(offline_hub, 'test_convnext.r160_in1k', published)
    teacher = main.build_teacher(teacher_args('test_convnext.r160_in1k'), None, 1000, torch.device('cpu'), None)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher.model.state_dict()['head.fc.weight'], published.head.fc.weight)
    assert teacher.inputs(x).shape == (2, 3, 160, 160)
    torch.testing.assert_close(teacher(x), published(teacher.inputs(x)), rtol=1e-4, atol=1e-4)


def test_a_hub_teacher_neither_cached_nor_reachable_is_one_line(imagefolder, offline_hub):
    args = teacher_args('test_convnext.r160_in1k')
    with pytest.raises(main.UserError) as error:
        main.build_teacher(args, None, 1000, torch.device('cpu'), None)
    message = str(error.value)
    assert 'test_convnext.r160_in1k' in message and str(offline_hub) in message and '--teacher-path' in message
    assert len(message.splitlines()) == 1


def test_a_hub_teacher_with_other_classes_says_to_finetune_it_first(imagefolder, offline_hub):
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--distillation-type', 'hard',
                   '--no-distillation-token', '--teacher-model', 'test_convnext.r160_in1k', '--teacher-pretrained',
                   *FAST, check=False)
    assert "hard distillation from test_convnext.r160_in1k (timm's pretrained weights)" in proc.stdout  # the summary
    assert_one_line_error(proc, 'predicts 1000 classes', 'has 3', '--finetune test_convnext.r160_in1k --input-size 160',
                          'Distil on your own data')


@pytest.mark.parametrize('flags, fragment', [
    (['--teacher-model', 'test_convnext.nope', '--teacher-pretrained'], 'no pretrained weights'),
    (['--teacher-model', 'test_convnext.r160_in1k', '--teacher-pretrained', '--teacher-path', __file__], 'keep one'),
    (['--finetune', 'test_vit.nope'], 'no pretrained weights'),
    (['--finetune', 'no_such_file.pth'], 'does not exist'),
    (['--mean', '0.5', '0.5', '0.5'], '--mean and --std go together'),
    (['--layer-decay', '1.5'], '--layer-decay must be in (0, 1]'),
], ids=['teacher-tag', 'two-teachers', 'finetune-tag', 'finetune-path', 'mean-alone', 'layer-decay'])
def test_bad_pretrained_flags_are_one_line(imagefolder, flags, fragment):
    distil = ['--distillation-type', 'hard', '--no-distillation-token'] if '--teacher-model' in flags else []
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', *distil, *flags, *FAST, check=False)
    assert_one_line_error(proc, fragment)


def test_finetune_from_a_hub_tag_takes_its_normalisation_into_eval_resume_and_export(imagefolder, tmp_path, offline_hub):
    """--finetune test_vit.r160_in1k from the hub cache (160 px, 1000 classes, mean = std = 0.5) at 48 px on
    3 classes: the classifier is replaced, the position embedding resized, and 0.5/0.5 is recorded in the
    checkpoint, which --eval --resume and export.py then use."""
    torch.manual_seed(0)
    published = timm.create_model('test_vit')
    fill_hub_cache(offline_hub, 'test_vit.r160_in1k', published)
    out = tmp_path / 'out'
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--finetune', 'test_vit.r160_in1k',
                   '--epochs', '1', '--lr', '0', '--min-lr', '0', '--no-model-ema', '--output_dir', out, *FAST,
                   '--input-size', '48')
    assert 'normalisation: mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5], as the weights of --finetune' in proc.stdout
    assert 'Removing key head.weight' in proc.stdout and 'Position embedding interpolated from 10x10 to 3x3' in proc.stdout
    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert checkpoint['args']['mean'] == checkpoint['args']['std'] == [0.5, 0.5, 0.5]
    torch.testing.assert_close(checkpoint['model']['blocks.0.attn.qkv.weight'], published.blocks[0].attn.qkv.weight)

    evaluated = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--eval', '--resume', out / 'checkpoint.pth',
                        *FAST, '--input-size', '48')
    assert 'normalisation: mean [0.5, 0.5, 0.5] std [0.5, 0.5, 0.5], as the weights of --resume' in evaluated.stdout
    metadata = export.export(str(out / 'checkpoint.pth'), str(tmp_path / 'model.safetensors'))
    assert metadata['mean'] == metadata['std'] == '0.5,0.5,0.5'
    hint = export.load_hint(str(tmp_path / 'model.safetensors'), metadata)
    namespace = {}
    exec(hint, namespace)  # the printed lines, run as a user would
    assert resolve_data_config(model=namespace['model'])['mean'] == HALF  # test_vit's own config: no overlay
    # a model whose pretrained config says ImageNet gets the run's normalisation in the printed overlay
    assert export.normalisation_overlay('deit_tiny_patch16_224', metadata) == ', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)'


def test_the_deit_family_keeps_imagenet_normalisation_from_the_hub(offline_hub):
    assert main.student_normalisation(None, None, '', 'deit_tiny_patch16_224.fb_in1k') == (
        list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


# ---------------------------------------------------------------------------------------------
# --layer-decay
# ---------------------------------------------------------------------------------------------

def test_layer_decay_gives_each_parameter_timms_learning_rate():
    args = main.get_args_parser().parse_args(['--layer-decay', '0.65', '--warmup-epochs', '0', '--lr', '1e-3',
                                              '--model', 'test_vit'])
    model = timm.create_model('test_vit', num_classes=3)
    optimizer = main.build_optimizer(args, model, torch.device('cpu'))
    scheduler, _ = create_scheduler(args, optimizer)
    scheduler.step(0)  # as main.train does before the first step
    lr_of = {id(p): group['lr'] for group in optimizer.param_groups for p in group['params']}
    timm_groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65,
                                           no_weight_decay_list=model.no_weight_decay())
    scales = {id(p): group['lr_scale'] for group in timm_groups for p in group['params']}
    layers = len(model.blocks) + 2  # the embeddings, each block, the head
    assert len(set(scales.values())) == layers
    names = {id(p): n for n, p in model.named_parameters()}
    for key, scale in scales.items():
        assert lr_of[key] == pytest.approx(1e-3 * scale, rel=1e-12), names[key]
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3) and lr_of[id(model.pos_embed)] == pytest.approx(1e-3 * 0.65 ** (layers - 1))


def test_resume_with_another_layer_decay_is_one_line(imagefolder, tmp_path):
    first = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--layer-decay', '0.75',
                    '--no-model-ema', '--output_dir', tmp_path, *FAST)
    assert 'x 0.75^depth (--layer-decay)' in first.stdout  # the settings summary
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '2', '--resume',
                   tmp_path / 'checkpoint.pth', '--no-model-ema', *FAST, check=False)
    assert_one_line_error(proc, 'was trained with --layer-decay 0.75', 'resume with the same')
