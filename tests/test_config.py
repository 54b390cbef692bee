"""--config FILE.yaml: defaults from a file, flags win, mistakes named; every recipe builds.

args.yaml from real runs is tested in test_quickstart.py.
"""
import argparse
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler

import config
import main
import run_with_submitit
import weights
from conftest import FAST, REPO, run_cli
from utils import UserError, is_url

CONFIGS = sorted((REPO / 'configs').rglob('*.yaml'))


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(parents=[main.get_args_parser()])
    return config.parse_args(parser, [str(a) for a in argv])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'run.yaml'
    path.write_text(text)
    return path


def test_config_sets_defaults_and_a_flag_overrides_it(tmp_path):
    path = write(tmp_path, 'batch-size: 32\nlr: 5e-4\nmodel_ema: false\nopt_betas: [0.9, 0.95]\ndata-set: DIGITS\n')
    args = parse('--config', path, '--batch-size', 7)
    assert args.batch_size == 7  # the flag wins
    assert args.lr == 5e-4 and isinstance(args.lr, float)  # PyYAML reads 5e-4 as a string
    assert args.model_ema is False and args.opt_betas == [0.9, 0.95] and args.data_set == 'DIGITS'
    assert parse('--config', path, '--model-ema').model_ema is True


@pytest.mark.parametrize('text,fragments', [
    ('batch_sise: 3\n', ["unknown key 'batch_sise'", "did you mean 'batch_size'"]),
    ('epochs: 2.5\n', ["'epochs'", 'must be int']),
    ('data-set: FOO\n', ["'data-set'", 'not one of']),
    ('batch-size: 3\nbatch_size: 4\n', ['batch_size a second time']),
    ('- 1\n', ['must map flag names to values']),
])
def test_a_mistake_in_the_config_is_one_error_line_naming_it(tmp_path, capsys, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_info:
        main.cli(['--config', str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and str(path) in err
    for fragment in fragments:
        assert fragment in err


def test_submitit_reads_the_config_with_its_own_keys(tmp_path):
    path = write(tmp_path, 'nodes: 3\nbatch-size: 16\n')
    args = run_with_submitit.parse_args(['--config', str(path), '--ngpus', '4'])
    assert (args.nodes, args.ngpus, args.batch_size) == (3, 4, 16)


@pytest.mark.parametrize('path', CONFIGS, ids=[str(p.relative_to(REPO / 'configs')) for p in CONFIGS])
def test_every_config_builds_its_model_optimizer_and_schedule(path):
    """All keys valid; the student, optimizer and schedule build (no weights are downloaded).

    On the meta device: the shapes are real, but DeiT-B's 86 M parameters cost no memory or init time.
    """
    assert path.read_text(encoding='utf-8').startswith('# ')  # the paper table / purpose comes first
    args = parse('--config', path)
    nb_classes = args.nb_classes or {'CIFAR10': 10, 'CIFAR100': 100, 'DIGITS': 10}.get(args.data_set, 1000)
    with torch.device('meta'):
        model = main.build_model(args, nb_classes)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, num_epochs = create_scheduler(args, optimizer)
    assert num_epochs == args.epochs + args.cooldown_epochs and scheduler is not None
    # timm's weights named by NAME.tag exist (checked against timm's registry: nothing is downloaded)
    if args.finetune and not is_url(args.finetune):
        weights.check_hub_weights(args.finetune, '--finetune')
    if args.teacher_pretrained:
        weights.check_hub_weights(args.teacher_model, '--teacher-model')


def test_paper_recipes_match_the_paper():
    recipes = {p.stem: parse('--config', p) for p in CONFIGS if p.parent.name == 'configs'}
    for name, args in recipes.items():
        if name.endswith('patch16_224'):  # ImageNet pre-training: 300 epochs, 1024 images on 8 GPUs
            assert (args.epochs, args.batch_size * 8, args.lr, args.weight_decay) == (300, 1024, 5e-4, 0.05)
            assert (args.mixup, args.cutmix, args.reprob, args.drop_path) == (0.8, 1.0, 0.25, 0.1)
            assert args.repeated_aug and args.model_ema and args.aa == 'rand-m9-mstd0.5-inc1'
            assert (args.distillation_type == 'hard') == ('distilled' in name)
    assert recipes['deit_base_distilled_patch16_224'].teacher_model == 'regnety_160'
    finetune = recipes['deit_base_patch16_384_finetune']
    assert (finetune.input_size, finetune.epochs, finetune.lr, finetune.min_lr, finetune.weight_decay,
            finetune.batch_size) == (384, 30, 5e-6, 5e-6, 1e-8, 32)
    for n in (10, 100):
        cifar = recipes[f'deit_base_patch16_224_cifar{n}']
        assert (cifar.data_set, cifar.opt, cifar.lr, cifar.weight_decay, cifar.reprob, cifar.drop_path) == \
            (f'CIFAR{n}', 'sgd', 0.01, 1e-4, 0.0, 0.0)


def test_load_config_rejects_a_missing_file(tmp_path):
    with pytest.raises(UserError, match='cannot read --config'):
        config.load_config(str(tmp_path / 'nope.yaml'), main.get_args_parser())


def test_an_eval_run_leaves_args_yaml_alone(tmp_path):
    config.save_args(parse('--eval', '--output_dir', tmp_path), main.get_args_parser())
    assert not (tmp_path / 'args.yaml').exists()


def test_args_yaml_repeats_the_scaled_lr_without_scaling_it_again(imagefolder, tmp_path):
    run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--epochs', 1, '--lr', 5e-4,
            '--output_dir', tmp_path / 'first')
    saved = config.load_config(str(tmp_path / 'first' / 'args.yaml'), main.get_args_parser())
    assert saved['lr'] == pytest.approx(5e-4 * 12 / 512) and saved['unscale_lr'] is True
    again = run_cli('--config', tmp_path / 'first' / 'args.yaml', '--output_dir', tmp_path / 'again')
    repeated = config.load_config(str(tmp_path / 'again' / 'args.yaml'), main.get_args_parser())
    assert repeated['lr'] == saved['lr'], again.stdout
