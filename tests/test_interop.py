"""Curves as pictures, torch.hub entry points and safetensors export."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import export
import hubconf
import models  # noqa: F401  (registers our students in timm's registry)
import utils
from conftest import FAST, REPO, run_cli
from tools import plot

MODEL = 'deit_micro_distilled_patch4_16'  # a distilled DeiT at 16 px: a run of seconds


@pytest.fixture(scope='module')
def real_run(imagefolder, tmp_path_factory):
    """One epoch of main.py with an EMA that moves (decay 0.9) away from the trained weights."""
    out = tmp_path_factory.mktemp('run')
    run_cli('--data-path', imagefolder, '--model', MODEL, '--lr', '2e-3', '--epochs', '1',
            '--model-ema-decay', '0.9', '--output_dir', out, *FAST, '--input-size', '16')
    return out


def eval_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


# ---------------------------------------------------------------------------------------------
# tools.plot
# ---------------------------------------------------------------------------------------------

def write_synthetic_log(run_dir, epochs: int = 4) -> None:
    run_dir.mkdir()
    lines = [json.dumps({'train_loss': 2.0 / (e + 1), 'train_lr': 5e-4 * (1 - e / epochs), 'test_loss': 1.5 / (e + 1),
                         'test_acc1': 20.0 * e, 'test_acc5': 50.0, 'epoch': e}) for e in range(epochs)]
    (run_dir / 'log.txt').write_text('\n'.join(lines) + '\n')


def test_plot_draws_two_runs_into_a_png_of_the_expected_size(real_run, tmp_path):
    synthetic = tmp_path / 'synthetic'
    write_synthetic_log(synthetic)
    png = tmp_path / 'curves.png'
    assert plot.cli([str(real_run), str(synthetic), '-o', str(png), '--title', 'two runs', '--dpi', '80']) == 0
    with Image.open(png) as image:
        assert image.format == 'PNG'
        assert image.size == (round(plot.FIGSIZE[0] * 80), round(plot.FIGSIZE[1] * 80))
        assert len(image.convert('L').getcolors(maxcolors=1 << 16)) > 10  # something is drawn


def test_plot_legend_names_every_run_and_the_ema_curve(real_run, tmp_path):
    synthetic = tmp_path / 'synthetic'
    write_synthetic_log(synthetic)
    runs = dict(zip(plot.run_labels([real_run, synthetic]), map(plot.read_log, [real_run, synthetic])))
    figure = plot.draw(runs)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes]
    assert legends[0] == [f'{real_run.name} train', f'{real_run.name} test', 'synthetic train', 'synthetic test']
    assert legends[1] == [f'{real_run.name} test', f'{real_run.name} EMA', 'synthetic test']  # EMA from main.py
    assert legends[2] == [real_run.name, 'synthetic']
    assert [ax.get_xlabel() for ax in figure.axes] == ['epoch'] * 3
    plot.plt.close(figure)


def test_plot_without_log_is_one_error_line_and_exit_2(tmp_path, capsys):
    assert plot.cli([str(tmp_path), '-o', str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ') and 'has no log.txt' in err
    assert not (tmp_path / 'x.png').exists()


# ---------------------------------------------------------------------------------------------
# hubconf.py
# ---------------------------------------------------------------------------------------------

def hub_entrypoints() -> list:
    """What torch.hub.list would list: the public callables of hubconf."""
    return [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')]


def test_hub_has_an_entrypoint_for_every_deit_and_every_model_of_ours():
    ours = [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith('models.')]
    assert sorted(hub_entrypoints()) == sorted(set(timm.list_models('deit*')) | set(ours))
    assert {'deit_tiny_distilled_patch16_224', 'deit3_small_patch16_224', 'deit_tiny_patch4_32',
            'convit_tiny_distilled', 'mobile_former_52m'} <= set(hub_entrypoints())


def test_hub_builds_every_entrypoint_and_deit_configs_keep_official_urls():
    with torch.device('meta'):  # every architecture, without memory or init time
        for name in hub_entrypoints():
            model = torch.hub.load(str(REPO), name, source='local', pretrained=False, verbose=False)
            assert isinstance(model, torch.nn.Module), name
            if timm.models.model_entrypoint(name).__module__ == hubconf._TIMM_DEIT_MODULE and name.startswith('deit_'):
                assert model.pretrained_cfg['url'].startswith('https://dl.fbaipublicfiles.com/deit/'), name


def test_hub_load_builds_the_readme_model_with_kwargs():
    model = torch.hub.load(str(REPO), 'deit_tiny_distilled_patch16_224', source='local', pretrained=False,
                           num_classes=7)
    assert eval_logits(model, torch.randn(1, 3, 224, 224)).shape == (1, 7)


def serve_checkpoint(served, name: str, state: dict, hash_prefix=None) -> str:
    """Save {'model': state} as name-<hash prefix>.pth (the right sha256 prefix unless given)."""
    staging = served / 'staging.pth'
    torch.save({'model': state}, staging)
    prefix = hash_prefix or hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    path = staging.rename(served / f'{name}-{prefix}.pth')
    return path.name


def test_hub_pretrained_downloads_hash_checks_and_loads_the_official_url(weights_server):
    served, base = weights_server
    reference = timm.create_model('deit_tiny_patch4_32')
    file_name = serve_checkpoint(served, 'deit_tiny_patch4_32', reference.state_dict())
    model = torch.hub.load(str(REPO), 'deit_tiny_patch4_32', source='local', pretrained=True,
                           pretrained_cfg_overlay=dict(url=f'{base}/{file_name}'))  # the cfg's 'url' field
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(eval_logits(model, images), eval_logits(reference, images))
    assert (Path(torch.hub.get_dir()) / 'checkpoints' / file_name).is_file()  # cached for the next load


def test_hub_pretrained_refuses_a_file_whose_hash_does_not_match_its_name(weights_server):
    served, base = weights_server
    file_name = serve_checkpoint(served, 'deit_tiny_patch4_32', timm.create_model('deit_tiny_patch4_32').state_dict(),
                                 hash_prefix='deadbeef')
    with pytest.raises(utils.UserError, match='invalid hash value'):
        torch.hub.load(str(REPO), 'deit_tiny_patch4_32', source='local', pretrained=True,
                       pretrained_cfg_overlay=dict(url=f'{base}/{file_name}'))


def test_hub_pretrained_checks_keys_strictly(weights_server):
    served, base = weights_server
    state = timm.create_model('deit_tiny_patch4_32').state_dict()
    del state['norm.bias']
    file_name = serve_checkpoint(served, 'deit_tiny_patch4_32', state)
    with pytest.raises(utils.UserError, match='missing keys: norm.bias'):
        torch.hub.load(str(REPO), 'deit_tiny_patch4_32', source='local', pretrained=True,
                       pretrained_cfg_overlay=dict(url=f'{base}/{file_name}'))


def test_hub_pretrained_loads_a_deit3_file_in_the_original_key_layout(weights_server):
    served, base = weights_server
    reference = timm.create_model('deit_small_patch16_18x2_LS', img_size=32, depth=2)
    renamed = {}
    for key, value in reference.state_dict().items():  # timm's parallel-block names -> models_v2.py's
        for ours, theirs in (('attns.0.norm', 'norm1'), ('attns.1.norm', 'norm11'), ('attns.1.attn', 'attn1'),
                             ('attns.1.ls.gamma', 'gamma_1_1'), ('attns.0.ls.gamma', 'gamma_1'),
                             ('attns.0.attn', 'attn'), ('ffns.0.norm', 'norm2'), ('ffns.1.norm', 'norm21'),
                             ('ffns.1.mlp', 'mlp1'), ('ffns.0.mlp', 'mlp'), ('ffns.1.ls.gamma', 'gamma_2_1'),
                             ('ffns.0.ls.gamma', 'gamma_2')):
            key = key.replace(f'.{ours}', f'.{theirs}')
        renamed[key] = value
    assert 'blocks.1.gamma_2_1' in renamed and 'blocks.0.norm11.weight' in renamed
    file_name = serve_checkpoint(served, 'deit_3_small_18x2', renamed)
    model = torch.hub.load(str(REPO), 'deit_small_patch16_18x2_LS', source='local', pretrained=True, img_size=32,
                           depth=2, pretrained_cfg_overlay=dict(url=f'{base}/{file_name}'))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(eval_logits(model, images), eval_logits(reference, images))


def test_hub_pretrained_without_a_url_says_so():
    with pytest.raises(utils.UserError, match='deit_tiny_patch4_32 has no official weights'):
        torch.hub.load(str(REPO), 'deit_tiny_patch4_32', source='local', pretrained=True)


# ---------------------------------------------------------------------------------------------
# export.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('ema', [False, True], ids=['model', 'ema'])
def test_exported_safetensors_load_into_timm_with_the_checkpoints_logits(real_run, tmp_path, ema, capsys):
    checkpoint = torch.load(real_run / 'checkpoint.pth', weights_only=True)
    output = tmp_path / 'model.safetensors'
    assert export.cli([str(real_run / 'checkpoint.pth'), '-o', str(output), *(['--ema'] if ema else [])]) == 0
    printed = capsys.readouterr().out
    assert f"pretrained_cfg_overlay=dict(file='{output}', num_classes=3)" in printed

    # the documented call: num_classes in the overlay, so that timm keeps the exported head
    loaded = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(output), num_classes=3))
    reference = timm.create_model(MODEL, num_classes=3)
    images = torch.randn(4, 3, 16, 16)
    reference.load_state_dict(checkpoint['model_ema' if ema else 'model'])
    assert torch.equal(eval_logits(loaded, images), eval_logits(reference, images))
    reference.load_state_dict(checkpoint['model' if ema else 'model_ema'])
    assert not torch.allclose(eval_logits(loaded, images), eval_logits(reference, images))  # the weights asked for

    from safetensors import safe_open
    with safe_open(str(output), 'pt') as f:
        assert f.metadata() == {'format': 'pt', 'model': MODEL, 'num_classes': '3', 'input_size': '16',
                                'weights': 'ema' if ema else 'model', 'mean': '0.485,0.456,0.406',
                                'std': '0.229,0.224,0.225'}  # the run's normalisation (ImageNet's)
    assert [p.name for p in tmp_path.iterdir()] == ['model.safetensors']  # no temporary left behind
    if ema:  # the printed lines, as printed, in a fresh interpreter started elsewhere
        saved = str(real_run / 'checkpoint.pth')
        code = textwrap.dedent(printed.split('load it in Python with:\n', 1)[1]) + textwrap.dedent(f"""
            import torch
            assert torch.equal(model.head.weight, torch.load({saved!r})['model_ema']['head.weight'])
            """)
        subprocess.run([sys.executable, '-c', code], cwd=tmp_path, check=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})


def test_export_ema_of_a_checkpoint_without_ema_is_one_error_line(tmp_path, capsys):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': timm.create_model('test_vit').state_dict(), 'model_ema': None}, path)
    assert export.cli([str(path), '-o', str(tmp_path / 'out.safetensors'), '--ema']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds no EMA weights' in err
    assert not (tmp_path / 'out.safetensors').exists()
