"""Users of the original facebookresearch/deit scripts: their checkpoints, their fine-tuned teachers,
their --epochs, their logs. The original-format artifacts are built here the way its main.py builds them."""
import argparse
import datetime
import json
import os
import pickletools
import re
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import ModelEma, get_state_dict

import checkpoint
import config
import main
from conftest import FAST, REPO, run_cli, run_main
from engine import LossScaler
from utils import UserError
from weights import load_checkpoint

MODEL = 'test_vit'  # a 0.3 M-parameter ViT, built for 32 px as main.py builds it
# What timm's NativeScaler (a CUDA GradScaler) saves after some fp16 steps.
CUDA_SCALER_STATE = {'scale': 1024.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                     '_growth_tracker': 7}


def original_args(**values) -> argparse.Namespace:
    """The Namespace the original main.py saves: its flags, what its setup adds, and under its submitit
    launcher `output_dir` / `job_dir` as Paths."""
    args = main.get_args_parser().parse_args([])
    # plain values, as the original's parser gives (ours marks its defaults with str and int subclasses)
    vars(args).update({name: str(value) if isinstance(value, str) else int(value)
                       for name, value in vars(args).items()
                       if isinstance(value, (str, int)) and not isinstance(value, bool)})
    vars(args).update(cooldown_epochs=10, nb_classes=3, distributed=True, rank=0, world_size=8, gpu=0,
                      dist_backend='nccl', output_dir=Path('/checkpoint/user/experiments/1234'),
                      job_dir=Path('/checkpoint/user/experiments/1234'), lr=5e-4 * 64 * 8 / 512)
    vars(args).update(values)
    return args


def save_original_checkpoint(path: Path, model: torch.nn.Module, epoch: int, args: argparse.Namespace) -> dict:
    """What the original main.py writes after `epoch`: one optimizer step taken, the scheduler stepped
    with the epoch at each epoch end, a timm ModelEma, the fp16 scaler state and the args Namespace."""
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    model_ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model_ema.update(model)
    for e in range(epoch + 1):
        lr_scheduler.step(e)
    payload = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
               'lr_scheduler': lr_scheduler.state_dict(), 'epoch': epoch, 'model_ema': get_state_dict(model_ema),
               'scaler': dict(CUDA_SCALER_STATE), 'args': args}
    torch.save(payload, path)
    return payload


def pickled_globals(path: Path) -> set:
    """The classes and functions a torch checkpoint's pickle names (GLOBAL opcodes)."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    return {arg.replace(' ', '.') for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL'}


@pytest.fixture(scope='module')
def original_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp('original') / 'checkpoint.pth'
    torch.manual_seed(0)
    payload = save_original_checkpoint(path, timm.create_model(MODEL, num_classes=3, img_size=32), 0,
                                       original_args(model=MODEL, epochs=3, warmup_epochs=1))
    return path, payload


def read_log(output_dir: Path) -> list:
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


ORIGINAL_LINE = 'a checkpoint of the original facebookresearch/deit main.py'


# ---------------------------------------------------------------------------------------------
# Original-format checkpoints
# ---------------------------------------------------------------------------------------------

def test_an_original_checkpoint_names_only_namespace_and_path_besides_torch_data(original_checkpoint, capsys):
    path, payload = original_checkpoint
    foreign = {g for g in pickled_globals(path) if not g.startswith(('torch.', 'collections.OrderedDict'))}
    assert foreign == {'argparse.Namespace', 'pathlib.PosixPath'}

    loaded = load_checkpoint(str(path))
    assert capsys.readouterr().out.count(ORIGINAL_LINE) == 1
    assert loaded['args']['output_dir'] == '/checkpoint/user/experiments/1234'  # plain data, read as a dict
    assert loaded['args']['opt'] == 'adamw' and loaded['epoch'] == 0 and loaded['scaler'] == CUDA_SCALER_STATE
    assert all(torch.equal(loaded['model'][k], v) for k, v in payload['model'].items())


class Payload:
    def __reduce__(self):
        return (os.system, (f'touch {MARKER}',))


MARKER = None


@pytest.mark.parametrize('value, culprit', [(Payload(), 'GLOBAL posix.system'),
                                            (datetime.date(2021, 1, 1), 'GLOBAL datetime.date')])
def test_a_namespace_holding_any_other_global_is_still_refused(tmp_path, value, culprit):
    global MARKER
    MARKER = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'args': argparse.Namespace(opt='adamw', extra=value)}, path)
    with pytest.raises(UserError, match=f'refusing to load .*pickled code \\({culprit}\\)'):
        load_checkpoint(str(path))
    assert not MARKER.exists()


def printed_eval(stdout: str) -> str:
    return re.search(r'\* Acc@1 \S+ Acc@5 \S+ loss \S+', stdout).group(0)


def test_eval_of_an_original_checkpoint_by_url_prints_what_a_native_one_prints(
        original_checkpoint, imagefolder, weights_server, tmp_path):
    path, payload = original_checkpoint
    folder, base = weights_server
    (folder / 'original.pth').write_bytes(path.read_bytes())
    native = tmp_path / 'native.pth'
    torch.save({'model': payload['model']}, native)
    common = ['--data-path', imagefolder, '--model', MODEL, '--eval', *FAST]
    ours = run_cli(*common, '--resume', native)
    theirs = run_cli(*common, '--resume', f'{base}/original.pth')  # weights_server's fresh torch.hub cache
    assert theirs.stdout.count(ORIGINAL_LINE) == 1
    assert printed_eval(theirs.stdout) == printed_eval(ours.stdout)


def test_resume_of_an_original_checkpoint_restores_optimizer_scheduler_ema_and_scaler(original_checkpoint):
    path, payload = original_checkpoint
    args = main.get_args_parser().parse_args(['--model', MODEL, '--epochs', '3', '--warmup-epochs', '1',
                                              '--resume', str(path)])
    model = timm.create_model(MODEL, num_classes=3, img_size=32)
    optimizer = create_optimizer(args, model)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    scaler = LossScaler(enabled=True, device_type='cpu')  # what fp16 training on CUDA uses
    ema = timm.utils.ModelEmaV3(model)
    state = checkpoint.TrainingState(model, optimizer, lr_scheduler, scaler, ema, config.plain_args(args),
                                     main.samples_per_step(args))
    state.resume(args.resume, weights_only=False, opt=args.opt, batch_size=args.batch_size,
                 accum_steps=args.grad_accum_steps, world_size=1, scaled_lr=args.lr)

    assert (state.start_epoch, state.start_step) == (1, 0)
    assert args.start_epoch == 0  # the command line's value: the run reads where to start from the state
    for ours, theirs in ((model, payload['model']), (ema.module, payload['model_ema'])):
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.items())
    assert not torch.equal(payload['model_ema']['head.weight'], payload['model']['head.weight'])  # two weights
    saved = payload['optimizer']['state']
    assert all(torch.equal(optimizer.state_dict()['state'][i]['exp_avg'], saved[i]['exp_avg']) for i in saved)
    assert scaler.state_dict()['scale'] == 1024.0 and scaler.state_dict()['_growth_tracker'] == 7
    assert lr_scheduler.state_dict()['t_initial'] == payload['lr_scheduler']['t_initial']
    # epoch 1 trains at the schedule's lr of epoch 1 (the end of warm-up), not at the original's lagged one
    assert optimizer.param_groups[0]['lr'] == pytest.approx(lr_scheduler._get_lr(1)[0])
    assert optimizer.param_groups[0]['lr'] != pytest.approx(payload['lr_scheduler']['warmup_lr_init'])


def test_resume_run_of_an_original_checkpoint_continues_at_the_next_epoch(original_checkpoint, imagefolder, tmp_path):
    path, _ = original_checkpoint
    proc = run_cli('--data-path', imagefolder, '--model', MODEL, '--epochs', '2', '--resume', path,
                   '--output_dir', tmp_path, *FAST)
    assert proc.stdout.count(ORIGINAL_LINE) == 1
    assert 'Continuing at epoch 1 step 0' in proc.stdout
    assert [row['epoch'] for row in read_log(tmp_path)] == [1]
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['epoch'] == 1


def test_finetune_and_teacher_from_original_checkpoints_at_another_input_size(
        original_checkpoint, imagefolder, weights_server, tmp_path):
    """--finetune of an original file at 48 px, distilling from a teacher in the original format by URL."""
    path, _ = original_checkpoint
    folder, base = weights_server
    torch.manual_seed(0)
    save_original_checkpoint(folder / 'teacher.pth', timm.create_model('regnety_002', num_classes=3), 2,
                             original_args(model='regnety_002'))
    proc = run_cli('--data-path', imagefolder, '--model', MODEL, '--finetune', path, '--epochs', '1',
                   '--distillation-type', 'soft', '--no-distillation-token', '--teacher-model', 'regnety_002',
                   '--teacher-path', f'{base}/teacher.pth', '--output_dir', tmp_path, *FAST, '--input-size', '48')
    assert proc.stdout.count(ORIGINAL_LINE) == 2
    assert 'Position embedding interpolated from 2x2 to 3x3' in proc.stdout
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model']['pos_embed'].shape == (1, 1 + 9, 64)


# ---------------------------------------------------------------------------------------------
# --epochs N trains N epochs, at the original's learning rates
# ---------------------------------------------------------------------------------------------

def original_lrs(epochs: int, warmup_epochs: int, lr: float) -> list:
    """The lr of each epoch of the original main.py: its scheduler (its --cooldown-epochs default of 10
    included), stepped with the epoch number at each epoch end, over `range(epochs)`."""
    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=lr)
    lr_scheduler, _ = create_scheduler(original_args(epochs=epochs, warmup_epochs=warmup_epochs, lr=lr), optimizer)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        lr_scheduler.step(epoch)
    return lrs


def test_the_default_schedule_has_no_cooldown_and_an_explicit_one_still_runs():
    for flags, total in (([], 300), (['--cooldown-epochs', '10'], 310)):
        args = main.get_args_parser().parse_args(['--epochs', '300', *flags])
        lr_scheduler, num_epochs = create_scheduler(args, torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), 0.1))
        assert num_epochs == total
        assert lr_scheduler.t_initial == 300 and lr_scheduler._get_lr(300)[0] == args.min_lr  # the same cosine


def test_epochs_n_trains_n_epochs_with_the_schedules_lr_of_each_epoch(imagefolder, tmp_path):
    cut = FAST.index('--cooldown-epochs')
    default_cooldown = FAST[:cut] + FAST[cut + 2:]
    proc = run_cli('--data-path', imagefolder, '--model', MODEL, '--epochs', '3', '--lr', '1e-3', '--no-model-ema',
                    '--output_dir', tmp_path, *default_cooldown, '--warmup-epochs', '1')
    assert 'Start training for 3 epochs\n' in proc.stdout
    log = read_log(tmp_path)
    assert [row['epoch'] for row in log] == [0, 1, 2]
    lr = 1e-3 * 12 / 512.0
    args = original_args(epochs=3, warmup_epochs=1, lr=lr)
    args.cooldown_epochs = 0
    lr_scheduler, _ = create_scheduler(args, torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=lr))
    schedule = [lr_scheduler._get_lr(epoch)[0] for epoch in range(3)]
    assert [row['train_lr'] for row in log] == pytest.approx(schedule, rel=1e-12)
    # the one deliberate difference: the original trains epoch e > 0 at the value of e - 1
    assert original_lrs(3, 1, lr)[1:] == pytest.approx(schedule[:2], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# --finetune replaces any model's classifier; distil on your own data
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, classifier_keys', [
    ('regnety_002', {'head.fc.weight', 'head.fc.bias'}),
    ('resnet10t', {'fc.weight', 'fc.bias'}),
    ('mobilenetv3_small_050', {'classifier.weight', 'classifier.bias'}),
    ('deit_tiny_distilled_patch4_32', {'head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'}),
])
def test_finetune_replaces_the_classifier_of_any_model_and_keeps_everything_else(tmp_path, capsys, name,
                                                                                 classifier_keys):
    source = timm.create_model(name, num_classes=7).state_dict()
    path = tmp_path / 'source.pth'
    torch.save({'model': source}, path)
    model = timm.create_model(name, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    main.load_finetune_weights(model, str(path))
    removed = set(re.findall(r'Removing key (\S+) from pretrained', capsys.readouterr().out))
    assert removed == classifier_keys
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in classifier_keys)  # a fresh head for the 3 classes
    assert all(torch.equal(after[k], source[k]) for k in after if k not in classifier_keys)


def test_finetune_still_refuses_a_checkpoint_whose_body_does_not_fit(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'model': timm.create_model('regnety_004', num_classes=7).state_dict()}, path)
    with pytest.raises(UserError, match='does not fit the model: shapes differ: s1.b1.conv1'):
        main.load_finetune_weights(timm.create_model('regnety_002', num_classes=3), str(path))


def test_distil_on_your_own_data_with_the_readme_commands(imagefolder, tmp_path):
    """README "Distil on your own data" at small scale: its two commands, with small models standing in
    for RegNetY-16GF and DeiT-S, each started from weights of another class count."""
    torch.manual_seed(0)
    for name, model in (('regnety', 'regnety_002'), ('deit', 'deit_micro_distilled_patch4_16')):
        torch.save({'model': timm.create_model(model, num_classes=7).state_dict()}, tmp_path / f'{name}.pth')
    small = ['--epochs', '1', *FAST]
    teacher = run_cli('--config', 'configs/regnety_160_finetune.yaml', '--data-path', imagefolder,
                      '--output_dir', tmp_path / 'teacher', '--model', 'regnety_002',
                      '--finetune', tmp_path / 'regnety.pth', *small)
    assert 'Removing key head.fc.weight' in teacher.stdout
    student = run_cli('--config', 'configs/deit_small_distilled_patch16_224.yaml',
                      '--finetune', tmp_path / 'deit.pth', '--teacher-path', tmp_path / 'teacher' / 'checkpoint.pth',
                      '--data-path', imagefolder, '--output_dir', tmp_path / 'student',
                      '--model', 'deit_micro_distilled_patch4_16', '--teacher-model', 'regnety_002', *small,
                      '--input-size', '16')
    assert 'Removing key head_dist.weight' in student.stdout
    log = read_log(tmp_path / 'student')
    assert [row['epoch'] for row in log] == [0] and 'test_acc1_dist' in log[0]


# ---------------------------------------------------------------------------------------------
# Training metrics averaged over ranks
# ---------------------------------------------------------------------------------------------

def train_one_epoch_on_each_rank(output_dir: str) -> None:
    """Under torchrun: one epoch of engine.train_one_epoch at lr 0 on data of this rank only; writes the
    returned averages and this rank's own mean loss (the model does not move: computed beforehand)."""
    import torch.distributed as dist
    from engine import TrainOptions, train_one_epoch
    from losses import DistillationLoss
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.Linear(4, 3)
    data = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(3, 4, generator=data) * (1 + 3 * rank), torch.randint(0, 3, (3,), generator=data))
               for _ in range(4)]
    with torch.no_grad():
        own = sum(torch.nn.functional.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    stats = train_one_epoch(model, criterion, batches, torch.optim.SGD(model.parameters(), lr=0.0),
                            torch.device('cpu'), 0, LossScaler(enabled=False, device_type='cpu'),
                            TrainOptions(print_freq=100))
    Path(output_dir, f'rank{rank}.json').write_text(json.dumps({'own': own, 'logged': stats['loss']}))
    dist.destroy_process_group()


def test_training_metrics_are_averaged_over_ranks(tmp_path):
    run_main(__file__, tmp_path, env={'PYTHONPATH': str(REPO)},
             launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'))
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    own = [r['own'] for r in ranks]
    assert abs(own[0] - own[1]) > 0.1  # the ranks saw different data
    for r in ranks:
        assert r['logged'] == pytest.approx(sum(own) / 2, rel=1e-6)


if __name__ == '__main__':  # the worker of test_training_metrics_are_averaged_over_ranks
    train_one_epoch_on_each_rank(sys.argv[1])


# ---------------------------------------------------------------------------------------------
# Optimizer state saved by another build of the optimizer
# ---------------------------------------------------------------------------------------------

FP16 = [flag for flag in FAST if flag != '--no-amp'] + ['--amp-dtype', 'float16']


def with_optimizer_groups(payload: dict, path: Path, **options) -> Path:
    """``payload`` saved to ``path`` with ``options`` set in each optimizer param group."""
    optimizer = {**payload['optimizer'], 'param_groups': [{**g, **options} for g in payload['optimizer']['param_groups']]}
    torch.save({**payload, 'optimizer': optimizer}, path)
    return path


@pytest.mark.parametrize('saved_by', ['the original scripts', 'a run with a foreach, non-fused AdamW'])
def test_fp16_resume_keeps_the_fused_optimizer_this_run_built(original_checkpoint, imagefolder, tmp_path, saved_by):
    """Optimizer.load_state_dict would make the fused AdamW non-fused while GradScaler still hands it the
    loss scale: the first fp16 step would fail."""
    path, payload = original_checkpoint
    if saved_by != 'the original scripts':
        path = with_optimizer_groups(payload, tmp_path / 'other.pth', fused=False, foreach=True)
    assert not any(g.get('fused') for g in torch.load(path, weights_only=False)['optimizer']['param_groups'])
    out = tmp_path / 'out'
    run_cli('--data-path', imagefolder, '--model', MODEL, '--epochs', '2', '--resume', path, '--output_dir', out, *FP16)
    resumed = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert resumed['epoch'] == 1 and resumed['scaler']['scale'] > 0
    assert all(g['fused'] is True and not g['foreach'] for g in resumed['optimizer']['param_groups'])


def test_resume_of_an_apex_fusedlamb_checkpoint_fills_the_options_apex_does_not_save(imagefolder, tmp_path):
    """DeiT III's --opt fusedlamb is apex's FusedLAMB: its groups lack the trust_clip and always_adapt that
    timm's Lamb (what --opt fusedlamb builds here) reads, and count 'step' as an int."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3, img_size=32)
    args = original_args(model=MODEL, epochs=3, warmup_epochs=1, opt='fusedlamb')
    optimizer = create_optimizer(argparse.Namespace(**{**vars(args), 'opt': 'lamb'}), model)  # main.py's groups
    lr_scheduler, _ = create_scheduler(args, optimizer)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    apex_keys = ('lr', 'bias_correction', 'betas', 'eps', 'weight_decay', 'grad_averaging', 'max_grad_norm',
                 'initial_lr', 'params')
    saved['param_groups'] = [{**{k: g[k] for k in apex_keys}, 'step': 1} for g in saved['param_groups']]
    path = tmp_path / 'deit3.pth'
    torch.save({'model': model.state_dict(), 'optimizer': saved, 'lr_scheduler': lr_scheduler.state_dict(),
                'epoch': 0, 'scaler': dict(CUDA_SCALER_STATE), 'args': args}, path)
    out = tmp_path / 'out'
    proc = run_cli('--data-path', imagefolder, '--model', MODEL, '--opt', 'fusedlamb', '--epochs', '2',
                   '--resume', path, '--output_dir', out, *FAST)
    steps = int(re.search(r'Epoch: \[1\] \[\s*\d+/(\d+)\]', proc.stdout).group(1))
    groups = torch.load(out / 'checkpoint.pth', weights_only=True)['optimizer']['param_groups']
    assert all(g['trust_clip'] is False and g['always_adapt'] is False for g in groups)
    assert all(int(g['step']) == 1 + steps for g in groups)  # apex's count, then this epoch's steps
