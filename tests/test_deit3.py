"""DeiT III: the original's model names, its checkpoints' key layout, LAMB, --cosub, --attn-only."""
import argparse
import re

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import ParallelThingsBlock

import checkpoint
import config
import main
import models  # noqa: F401
import utils
import weights
from conftest import FAST, REPO, run_cli
from engine import LossScaler, TrainOptions, train_one_epoch
from losses import CoSubLoss


# models_v2.py of the original, read by hand: name -> (patch, width, depth, heads, parallel x2, LayerScale).
# Every one has qkv bias, MLP ratio 4, LayerNorm eps 1e-6, LayerScale init 1e-4 and the position
# embedding on the patch tokens only.
ORIGINAL_MODELS = {
    'deit_tiny_patch16_LS': (16, 192, 12, 3, False, True),
    'deit_small_patch16_LS': (16, 384, 12, 6, False, True),
    'deit_medium_patch16_LS': (16, 512, 12, 8, False, True),
    'deit_base_patch16_LS': (16, 768, 12, 12, False, True),
    'deit_large_patch16_LS': (16, 1024, 24, 16, False, True),
    'deit_huge_patch14_LS': (14, 1280, 32, 16, False, True),
    'deit_huge_patch14_52_LS': (14, 1280, 52, 16, False, True),
    'deit_huge_patch14_26x2_LS': (14, 1280, 26, 16, True, True),
    'deit_Giant_48x2_patch14_LS': (14, 1664, 48, 16, True, True),
    'deit_giant_40x2_patch14_LS': (14, 1408, 40, 16, True, True),
    'deit_Giant_48_patch14_LS': (14, 1664, 48, 16, False, True),
    'deit_giant_40_patch14_LS': (14, 1408, 40, 16, False, True),
    'deit_small_patch16_36_LS': (16, 384, 36, 6, False, True),
    'deit_small_patch16_36': (16, 384, 36, 6, False, False),
    'deit_small_patch16_18x2_LS': (16, 384, 18, 6, True, True),
    'deit_small_patch16_18x2': (16, 384, 18, 6, True, False),
    'deit_base_patch16_18x2_LS': (16, 768, 18, 12, True, True),
    'deit_base_patch16_18x2': (16, 768, 18, 12, True, False),
    'deit_base_patch16_36x1_LS': (16, 768, 36, 12, False, True),
    'deit_base_patch16_36x1': (16, 768, 36, 12, False, False),
}

# timm's names of a parallel block's parameters -> the original's (Layer_scale_init_Block_paralx2).
PARALLEL_TO_ORIGINAL = {
    'attns.0.norm': 'norm1', 'attns.0.attn': 'attn', 'attns.0.ls.gamma': 'gamma_1',
    'attns.1.norm': 'norm11', 'attns.1.attn': 'attn1', 'attns.1.ls.gamma': 'gamma_1_1',
    'ffns.0.norm': 'norm2', 'ffns.0.mlp': 'mlp', 'ffns.0.ls.gamma': 'gamma_2',
    'ffns.1.norm': 'norm21', 'ffns.1.mlp': 'mlp1', 'ffns.1.ls.gamma': 'gamma_2_1',
}


def original_layout(state: dict) -> dict:
    """Our model's state dict under the key names that the original's models_v2.py writes."""
    out = {}
    for key, value in state.items():
        key = re.sub(r'^(blocks\.\d+\.)ls([12])\.gamma$', r'\1gamma_\2', key)
        for ours, theirs in PARALLEL_TO_ORIGINAL.items():
            key = re.sub(rf'^(blocks\.\d+\.){re.escape(ours)}(\.|$)', rf'\g<1>{theirs}\2', key)
        out[key] = value
    return out


def small(name: str, img_size: int = 32, seed: int = 0, depth: int = 2) -> torch.nn.Module:
    """The architecture at 32 px, 3 classes and 2 blocks: cheap on a CPU."""
    torch.manual_seed(seed)
    return timm.create_model(name, img_size=img_size, num_classes=3, depth=depth)


# ---------------------------------------------------------------------------------------------
# Model names
# ---------------------------------------------------------------------------------------------

def test_every_model_name_of_the_original_is_registered_and_nothing_else():
    ours = {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__ == 'models.deit3'}
    assert ours == set(ORIGINAL_MODELS)


@pytest.mark.parametrize('name', sorted(ORIGINAL_MODELS))
def test_model_has_the_original_architecture(name):
    patch, width, depth, heads, parallel, layer_scale = ORIGINAL_MODELS[name]
    with torch.device('meta'):  # the giants cost no memory
        model = timm.create_model(name, drop_path_rate=0.3)
    assert (model.patch_embed.patch_size, model.embed_dim, len(model.blocks)) == ((patch, patch), width, depth)
    assert model.no_embed_class and model.pos_embed.shape[1] == model.patch_embed.num_patches
    block = model.blocks[-1]
    assert isinstance(block, ParallelThingsBlock) == parallel
    attn = block.attns[1].attn if parallel else block.attn
    assert attn.num_heads == heads and attn.qkv.bias is not None
    layer_scales = [m for m in block.modules() if isinstance(m, timm.layers.LayerScale)]
    assert len(layer_scales) == (4 if parallel else 2) * layer_scale
    assert all(ls.init_values == 1e-4 for ls in layer_scales)
    assert model.norm.eps == 1e-6
    # the original's drop path is the full rate in every block (timm's default ramps it from 0)
    rates = [m.drop_prob for m in model.blocks.modules() if isinstance(m, DropPath)]
    assert rates == [0.3] * (depth * (4 if parallel else 2))


@pytest.mark.parametrize('name', ['deit_tiny_patch16_LS', 'deit_small_patch16_18x2_LS'])
def test_small_models_run_and_initialise_layer_scale_at_1e_4(name):
    model = small(name)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    gammas = [p for n, p in model.named_parameters() if n.endswith('gamma')]
    assert gammas and all(torch.all(g == 1e-4) for g in gammas)


# ---------------------------------------------------------------------------------------------
# Checkpoints in the original's key layout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['deit_tiny_patch16_LS', 'deit_small_patch16_18x2_LS', 'deit_small_patch16_18x2'])
def test_original_key_layout_loads_strictly_with_the_same_weights(name):
    source, target = small(name, seed=1), small(name, seed=2)
    original = original_layout(source.state_dict())
    assert set(original) != set(target.state_dict())  # the test really renames
    weights.load_state_checked(target, original, 'original.pth')
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_cait_keys_named_gamma_are_left_alone():
    cait = timm.create_model('cait_xxs24_224', img_size=32, num_classes=3, depth=2)
    state = cait.state_dict()
    assert any('.gamma_1' in k for k in state)
    assert weights.timm_key_names(state, cait) is state


def test_finetune_from_the_original_layout_at_another_input_size_interpolates_pos_embed(tmp_path):
    source = small('deit_small_patch16_18x2_LS', img_size=32, seed=1)
    path = tmp_path / 'original.pth'
    torch.save({'model': original_layout(source.state_dict())}, path)
    model = small('deit_small_patch16_18x2_LS', img_size=64, seed=2)
    model.reset_classifier(5)
    main.load_finetune_weights(model, str(path))
    assert model.pos_embed.shape == (1, 16, 384)  # 2x2 -> 4x4 patches, no class-token slot
    assert torch.equal(model.blocks[1].attns[1].ls.gamma, source.blocks[1].attns[1].ls.gamma)
    assert torch.equal(model.blocks[0].ffns[1].mlp.fc1.weight, source.blocks[0].ffns[1].mlp.fc1.weight)


def test_resume_of_an_original_layout_checkpoint_restores_model_and_ema(tmp_path):
    source, ema_source = small('deit_tiny_patch16_LS', seed=1), small('deit_tiny_patch16_LS', seed=3)
    path = tmp_path / 'checkpoint.pth'
    optimizer = torch.optim.AdamW(source.parameters())
    scheduler, _ = timm.scheduler.create_scheduler(main.get_args_parser().parse_args([]), optimizer)
    torch.save({'model': original_layout(source.state_dict()), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': scheduler.state_dict(), 'epoch': 4, 'scaler': {},
                'model_ema': original_layout(ema_source.state_dict())}, path)
    args = main.get_args_parser().parse_args(['--resume', str(path)])
    model = small('deit_tiny_patch16_LS', seed=2)
    ema = timm.utils.ModelEmaV3(model)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler, _ = timm.scheduler.create_scheduler(args, optimizer)
    state = checkpoint.TrainingState(model, optimizer, scheduler, main.LossScaler(False, 'cpu'), ema,
                                     config.plain_args(args), main.samples_per_step(args))
    state.resume(args.resume, weights_only=False, opt=args.opt, batch_size=args.batch_size,
                 accum_steps=args.grad_accum_steps, world_size=1, scaled_lr=args.lr)
    assert state.start_epoch == 5
    assert torch.equal(model.blocks[1].ls2.gamma, source.blocks[1].ls2.gamma)
    assert torch.equal(ema.module.blocks[1].ls1.gamma, ema_source.blocks[1].ls1.gamma)


def test_eval_of_an_original_layout_checkpoint_gives_the_same_accuracy(imagefolder, tmp_path):
    source = small('deit_tiny_patch16_LS', seed=7, depth=12)  # not the run's seed-0 initialisation
    ours, original = tmp_path / 'ours.pth', tmp_path / 'original.pth'
    torch.save({'model': source.state_dict()}, ours)
    torch.save({'model': original_layout(source.state_dict())}, original)
    lines = []
    for path in (ours, original):
        out = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch16_LS', '--eval', '--resume', path,
                      *FAST).stdout
        lines.append([line for line in out.splitlines() if line.startswith('* Acc@1')])
    assert lines[0] and lines[0] == lines[1]


# ---------------------------------------------------------------------------------------------
# --opt fusedlamb / lamb
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('opt', ['fusedlamb', 'lamb'])
def test_lamb_is_timms_lamb_without_apex_and_says_so_once(opt, capsys):
    name = main.optimizer_name(opt)
    assert capsys.readouterr().out == f"--opt {opt}: timm's LAMB (timm.optim.Lamb)\n"
    optimizer = timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), opt=name, lr=1e-3)
    assert isinstance(optimizer, timm.optim.Lamb)


def test_other_optimizers_keep_their_name_silently(capsys):
    assert main.optimizer_name('adamw') == 'adamw' and capsys.readouterr().out == ''


# ---------------------------------------------------------------------------------------------
# --cosub
# ---------------------------------------------------------------------------------------------

def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits, written out."""
    p = logits.sigmoid()
    return -(target * p.log() + (1 - target) * (1 - p).log()).mean()


def test_cosub_loss_each_half_learns_from_the_labels_and_the_other_halfs_predictions():
    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]], requires_grad=True)
    b = torch.tensor([[-1.0, 0.5, 1.5], [1.0, -0.5, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.4]])
    loss = CoSubLoss()(torch.zeros(4, 1), torch.cat((a, b)), labels)
    expected = (bce(a, labels) + bce(b, labels) + bce(a, b.sigmoid()) + bce(b, a.sigmoid())) / 4
    assert torch.allclose(loss, expected.detach())
    loss.backward()
    # The other half's prediction is a fixed target: d/da = (sig(a) - y + sig(a) - sig(b)) / (4 numel).
    sa, sb = a.detach().sigmoid(), b.detach().sigmoid()
    assert torch.allclose(a.grad, (2 * sa - labels - sb) / (4 * a.numel()))
    assert torch.allclose(b.grad, (2 * sb - labels - sa) / (4 * b.numel()))


class Recorder(torch.nn.Module):
    """A linear classifier that keeps the last batch it saw."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        self.seen = x.detach().clone()
        return self.fc(x.flatten(1))


def test_cosub_training_step_runs_the_batch_twice_and_takes_the_four_term_loss():
    torch.manual_seed(0)
    model = Recorder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 4, 4)
    targets = torch.softmax(torch.randn(4, 3), dim=1)  # soft targets, as after Mixup
    stats = train_one_epoch(model, CoSubLoss(), [(images, targets, [])], torch.optim.SGD(model.parameters(), lr=0.0),
                            torch.device('cpu'), 0, LossScaler(False, 'cpu'), TrainOptions(print_freq=1))
    assert torch.equal(model.seen, torch.cat((images, images)))
    model.load_state_dict(before)
    logits = model(images)
    expected = (2 * bce(logits, targets) + 2 * bce(logits, logits.sigmoid())) / 4  # same weights, no drop path
    assert stats['loss'] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize('flags,fragment', [
    (['--mixup', '0', '--cutmix', '0'], 'enable --mixup or --cutmix'),
    (['--distillation-type', 'hard', '--teacher-path', __file__, '--model', 'deit_tiny_distilled_patch4_32'],
     'drop --distillation-type or --cosub'),
])
def test_cosub_refuses_what_it_cannot_honour(flags, fragment):
    args = main.get_args_parser().parse_args(['--cosub', *flags])
    with pytest.raises(utils.UserError, match=fragment):
        main.validate_args(args)


# ---------------------------------------------------------------------------------------------
# --attn-only, and a run with the DeiT III flags
# ---------------------------------------------------------------------------------------------

def attention_only_names(model) -> set:
    """What the original's --attn-only trains: '.attn.' parameters, the classifier, the position embedding."""
    return {n for n, _ in model.named_parameters() if '.attn.' in n} | {'head.weight', 'head.bias', 'pos_embed'}


@pytest.mark.parametrize('name', ['deit_tiny_patch16_LS', 'deit_small_patch16_18x2_LS'])
def test_attn_only_gradients_reach_exactly_attention_classifier_and_position_embedding(name):
    model = small(name)
    main.train_attention_only(model)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == attention_only_names(model)
    assert {'blocks.1.attns.1.attn.qkv.weight' if 'x2' in name else 'blocks.1.attn.proj.bias'} <= with_grad
    assert not with_grad & {'cls_token', 'patch_embed.proj.weight', 'norm.weight'}


def test_a_deit3_run_with_cosub_attn_only_fusedlamb_and_distributed_trains_only_attention(imagefolder, tmp_path):
    source = small('deit_tiny_patch16_LS', seed=1, depth=12)
    original = tmp_path / 'original.pth'
    torch.save({'model': original_layout(source.state_dict())}, original)
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch16_LS', '--finetune', original,
                   '--attn-only', '--cosub', '--opt', 'fusedlamb', '--distributed', '--epochs', '1',
                   '--lr', '1e-2', '--no-model-ema', '--output_dir', tmp_path / 'out', *FAST)
    assert proc.stdout.count("--opt fusedlamb: timm's LAMB") == 1 and 'Not using distributed mode' in proc.stdout
    trained = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)['model']
    trainable = attention_only_names(source)
    for key, value in source.state_dict().items():
        assert torch.equal(trained[key], value) == (key not in trainable), key
    n_trainable = sum(p.numel() for n, p in source.named_parameters() if n in trainable)
    assert f'number of params: {n_trainable}' in proc.stdout


# ---------------------------------------------------------------------------------------------
# configs/deit3: the README_revenge commands
# ---------------------------------------------------------------------------------------------

# From the original's README_revenge commands: config -> (input, images per step, lr, epochs, weight
# decay, drop path, LAMB, 3-Augment + simple random crop, binary cross-entropy, top-1 it reproduces).
REVENGE = {
    'deit_small_patch16_LS_224_in1k': (224, 2048, 4e-3, 800, 0.05, 0.05, True, (True, False), True, 81.4),
    'deit_base_patch16_LS_192_in1k': (192, 2048, 3e-3, 800, 0.05, 0.2, True, (True, False), True, 83.8),
    'deit_large_patch16_LS_192_in1k': (192, 2048, 3e-3, 800, 0.05, 0.45, True, (True, False), True, 84.9),
    'deit_huge_patch14_LS_160_in1k': (160, 2048, 3e-3, 800, 0.05, 0.6, True, (True, False), True, 85.2),
    'deit_small_patch16_LS_384_in1k_finetune': (384, 512, 1e-5, 20, 0.1, 0.0, False, (False, False), False, 83.4),
    'deit_base_patch16_LS_224_in1k_finetune': (224, 512, 1e-5, 20, 0.1, 0.2, False, (False, False), False, 83.8),
    'deit_large_patch16_LS_224_in1k_finetune': (224, 512, 1e-5, 20, 0.1, 0.45, False, (False, False), False, 84.9),
    'deit_huge_patch14_LS_224_in1k_finetune': (224, 512, 1e-5, 20, 0.1, 0.55, False, (False, False), False, 85.2),
    'deit_small_patch16_LS_224_in21k': (224, 2048, 1e-3, 240, 0.02, 0.05, True, (True, True), False, 83.1),
    'deit_base_patch16_LS_224_in21k': (224, 2048, 1e-3, 240, 0.02, 0.1, True, (True, True), False, 85.7),
    'deit_large_patch16_LS_224_in21k': (224, 2048, 1e-3, 240, 0.02, 0.3, True, (True, True), False, 87.0),
    'deit_huge_patch14_LS_128_in21k': (128, 2048, 1e-3, 90, 0.02, 0.5, True, (True, True), False, 87.2),
    'deit_small_patch16_LS_224_in21k_finetune': (224, 2048, 3e-4, 50, 0.02, 0.05, True, (True, True), False, 83.1),
    'deit_base_patch16_LS_224_in21k_finetune': (224, 2048, 3e-4, 50, 0.02, 0.15, True, (True, True), False, 85.7),
    'deit_large_patch16_LS_224_in21k_finetune': (224, 2048, 3e-4, 50, 0.02, 0.4, True, (True, True), False, 87.0),
    'deit_huge_patch14_LS_224_in21k_finetune': (224, 2048, 3e-4, 50, 0.02, 0.45, True, (True, True), False, 87.2),
}


@pytest.mark.parametrize('name', sorted(REVENGE))
def test_deit3_recipe_matches_the_readme_revenge_command(name):
    path = REPO / 'configs' / 'deit3' / f'{name}.yaml'
    text = path.read_text()
    args = config.parse_args(argparse.ArgumentParser(parents=[main.get_args_parser()]), ['--config', str(path)])
    size, images, lr, epochs, wd, drop_path, lamb, (three_augment, src), bce, top1 = REVENGE[name]
    gpus = int(re.search(r'--nodes (\d+) --ngpus 8', text).group(1)) * 8
    assert (args.input_size, args.batch_size * gpus, args.lr, args.epochs, args.weight_decay, args.drop_path) == \
        (size, images, lr, epochs, wd, drop_path)
    assert (args.opt == 'lamb') == lamb and (args.ThreeAugment, args.src, args.bce_loss) == (three_augment, src, bce)
    assert args.unscale_lr and args.cooldown_epochs == 0 and args.model == name.split('_LS')[0] + '_LS'
    assert f'{top1}% top-1' in text.split('\n# Run:')[0] and 'table' in text.splitlines()[0]
