"""Reading weights: checkpoint files and URLs (ours, official, the original DeiT scripts'), loaded as
plain data, and fitted to a model (timm key names, position embeddings resized, mismatches in one line).

What a run's checkpoint holds, and when and how it is written, is checkpoint.py's.
"""
import argparse
import os
import pickle
import re
import zipfile
from pathlib import PosixPath, PurePath
from typing import Optional, Tuple
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import ParallelThingsBlock, VisionTransformer, checkpoint_filter_fn

from utils import UserError, first_line, is_url


# The only classes besides tensors and containers that a checkpoint of the original
# facebookresearch/deit main.py holds: its `args` (a Namespace; under its submitit launcher
# `output_dir` and `job_dir` are Paths). Both are plain data: building them runs no user code.
ORIGINAL_SCRIPT_GLOBALS = [argparse.Namespace, PosixPath,
                           (PosixPath, 'pathlib._local.PosixPath')]  # the name Python >= 3.13 writes


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file or URL as plain data (``weights_only=True``: no pickled code runs).

    Files written by the original DeiT scripts load too: their ``args`` Namespace becomes a dict.
    URLs must be https (http only for 127.0.0.1, for tests); they are downloaded once into the
    torch.hub cache, and a file name of the form ``name-<sha256 prefix>.pth`` is hash-checked.
    """
    local = local_copy(path)
    if is_safetensors(local):
        return read_safetensors(local, path)
    damage = checkpoint_damage(local)
    if damage:
        raise UserError(f'cannot read checkpoint {path}: {damage}')
    try:
        with torch.serialization.safe_globals(ORIGINAL_SCRIPT_GLOBALS):
            checkpoint = torch.load(local, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file would run code
        found = re.search(r'GLOBAL [\w.]+', str(e))
        culprit = found.group(0) if found else 'an unsupported object'
        raise UserError(f'refusing to load {path}: it holds pickled code ({culprit}), not plain weights; '
                        're-save it as plain tensors') from None
    except Exception as e:  # not a torch file, an unreadable record, ...
        raise UserError(f'cannot read checkpoint {path}: {first_line(e)}') from None
    return with_plain_args(checkpoint, path)


def is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header ('{')."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def read_safetensors(local: str, path: str) -> dict:
    """The tensors of a safetensors file (timm's and the hub's weight format) as a bare state dict.

    safetensors holds tensors only, so it needs no weights_only guard; its header is checked
    against the file size, so a truncated copy is refused here, not half-loaded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(local, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f'cannot read safetensors file {path}: {first_line(e)} (a truncated or corrupted '
                        f'copy?)') from None


def local_copy(path: str) -> str:
    """The local file of a checkpoint path or URL (https, or http from 127.0.0.1 for tests; downloaded
    once into the torch.hub cache)."""
    if is_url(path):
        url = urlparse(path)
        if url.scheme != 'https' and url.hostname not in ('127.0.0.1', 'localhost'):
            raise UserError(f'refusing to download {path} over plain http: use an https URL')
        try:
            return download_once(path)
        except Exception as e:  # unreachable, refused, or a hash prefix that does not match the bytes
            raise UserError(f'could not download {path}: {first_line(e)}') from None
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist: check the path')
    return path


def recorded_args(path: str) -> dict:
    """The run arguments the checkpoint at ``path`` recorded (ours, the original scripts'), read without
    its tensors (memory-mapped); {} when it records none, or when it cannot be read so (safetensors, a
    legacy or damaged file), in which case reading it in full, load_checkpoint, says what is wrong."""
    local = local_copy(path)
    try:
        with torch.serialization.safe_globals(ORIGINAL_SCRIPT_GLOBALS):
            checkpoint = torch.load(local, map_location='cpu', weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile):
        return {}
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def hub_pretrained_cfg(name: str):
    """timm's pretrained config of ``name`` (``NAME`` or ``NAME.tag``; a bare name is its default tag),
    or None when timm publishes no weights under that name."""
    if not timm.is_model(name):
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # a tag timm does not know
        return None
    return cfg if cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file) else None


def is_hub_weights(source: str) -> bool:
    """``source`` names timm pretrained weights (``NAME.tag``), not a checkpoint file or URL."""
    return bool(source) and not is_url(source) and not os.path.exists(source) and hub_pretrained_cfg(source) is not None


def check_hub_weights(name: str, flag: str) -> None:
    """A UserError unless timm publishes pretrained weights under ``name``."""
    if hub_pretrained_cfg(name) is None:
        tags = timm.list_pretrained(f'{name.split(".")[0]}.*')[:4] if timm.is_model(name) else []
        raise UserError(f'{flag} {name}: timm has no pretrained weights of that name'
                        + (f' (its tags: {", ".join(tags)} ...)' if tags else '')
                        + '; see timm.list_pretrained(), or give a checkpoint file or https URL')


def create_pretrained(name: str, flag: str, alternative: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``: timm's weights, through timm's hub cache
    (HF_HUB_CACHE, downloaded there once; HF_HUB_OFFLINE=1 reads only the cache).

    Weights that are neither cached nor downloadable are one UserError line saying how to fill the
    cache, or which flag takes a local file instead (``alternative``).
    """
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:  # not cached and the hub unreachable (LocalEntryNotFoundError), HTTP errors, ...
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise UserError(f"{flag} {name}: timm's pretrained weights are not in the hub cache ({cache}) and could "
                        f'not be downloaded ({first_line(e)}): fill the cache where the hub is reachable '
                        f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\", then copy "
                        f'{cache} here, or point HF_HUB_CACHE at a copy), or {alternative}') from None


def normalisation_of(source: str) -> Optional[Tuple[list, list]]:
    """The input mean and std the weights at ``source`` were trained with: a hub tag's pretrained config,
    or the args a checkpoint recorded (ours); None when the source does not say."""
    if is_hub_weights(source):
        cfg = hub_pretrained_cfg(source)
        return list(cfg.mean), list(cfg.std)
    args = recorded_args(source)
    if args.get('mean') is None or args.get('std') is None:
        return None
    return list(args['mean']), list(args['std'])


def checkpoint_args(checkpoint) -> dict:
    """The run arguments a checkpoint recorded (ours, the original scripts'), or {}."""
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    return args if isinstance(args, dict) else {}


def download_once(url: str) -> str:
    """The torch.hub cache's copy of ``url``, downloaded on first use as torch.hub.load_state_dict_from_url
    does (atomically, a ``name-<sha256 prefix>.pth`` file name hash-checked); the path, so that the
    file is checked and loaded like a local one."""
    name = os.path.basename(urlparse(url).path)
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        prefix = torch.hub.HASH_REGEX.search(name)
        torch.hub.download_url_to_file(url, cached, hash_prefix=prefix.group(1) if prefix else None, progress=False)
    return cached


def with_plain_args(checkpoint, path: str):
    """A checkpoint of the original main.py with its ``args`` Namespace as a dict of plain values."""
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get('args'), argparse.Namespace)):
        return checkpoint
    print(f'{path}: a checkpoint of the original facebookresearch/deit main.py (its args read as plain data)')
    args = {k: str(v) if isinstance(v, PurePath) else v for k, v in vars(checkpoint['args']).items()}
    return {**checkpoint, 'args': args}


def checkpoint_damage(path: str) -> str:
    """What makes ``path`` no checkpoint torch.load should read ('' if nothing): torch.load reads a zip
    archive without checking its CRCs (a flipped bit loads silently), and reads any file as a pickle."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
        if not zipfile.is_zipfile(path):  # legacy torch files and plain pickles start with PROTO (0x80)
            if head[:1] == b'\x80':
                return ''
            if head == b'PK\x03\x04':  # a zip's first entry, without the central directory written last
                return ('truncated: a zip archive whose end is missing (a half-written .tmp file or an '
                        'interrupted copy); use the complete checkpoint')
            return ('not a PyTorch checkpoint (neither a zip archive nor a pickle; safetensors files load '
                    'as they are)')
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as e:
        return f'damaged archive ({e})'
    return f'damaged: {bad} fails its CRC check (a corrupted or truncated copy)' if bad else ''


def model_state_from_checkpoint(checkpoint: dict, path: str) -> dict:
    """The model weights of an official-format checkpoint ({'model': ...}) or of a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path} is not a checkpoint: expected a dict, found {type(checkpoint).__name__}')
    state = checkpoint.get('model', checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model weights: expected {{'model': state_dict}} or a state_dict")
    return state


def model_or_ema_state(checkpoint: dict, path: str, ema: bool) -> dict:
    """The model weights of a checkpoint, or with ``ema`` its EMA weights ('model_ema')."""
    if not ema:
        return model_state_from_checkpoint(checkpoint, path)
    if not isinstance(checkpoint, dict) or not checkpoint.get('model_ema'):
        raise UserError(f'{path} holds no EMA weights (trained with --no-model-ema?): drop --ema')
    return model_state_from_checkpoint({'model': checkpoint['model_ema']}, f'{path} (EMA)')


def interpolate_pos_embed(checkpoint_model: dict, model: torch.nn.Module) -> None:
    """Resize ``checkpoint_model['pos_embed']`` in place to the patch grid of ``model``.

    The leading class/distillation tokens are kept as they are; the grid part is resampled
    bicubically (as the original DeiT fine-tuning code does), e.g. 14x14 (224 px) -> 24x24 (384 px).
    """
    if 'pos_embed' not in checkpoint_model or not hasattr(model, 'patch_embed'):
        return
    old = checkpoint_model['pos_embed']
    num_prefix = model.pos_embed.shape[-2] - model.patch_embed.num_patches
    old_grid = int((old.shape[-2] - num_prefix) ** 0.5)
    new_grid = model.patch_embed.grid_size
    if (old_grid, old_grid) == tuple(new_grid):
        return
    print(f'Position embedding interpolated from {old_grid}x{old_grid} to {new_grid[0]}x{new_grid[1]}')
    checkpoint_model['pos_embed'] = resample_abs_pos_embed(
        old, new_size=list(new_grid), old_size=[old_grid, old_grid], num_prefix_tokens=num_prefix,
        interpolation='bicubic', antialias=False)


def describe_state_mismatch(model: torch.nn.Module, state: dict, strict: bool = True) -> str:
    """Missing/unexpected keys and shape clashes between ``state`` and ``model`` ('' if it fits)."""
    own = model.state_dict()
    problems = []
    shapes = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}'
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shapes:
        problems.append(f'shapes differ: {", ".join(shapes[:4])}' + (' ...' if len(shapes) > 4 else ''))
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f'missing keys: {", ".join(missing[:4])}' + (' ...' if len(missing) > 4 else ''))
        if unexpected:
            problems.append(f'unexpected keys: {", ".join(unexpected[:4])}'
                            + (' ...' if len(unexpected) > 4 else ''))
    return '; '.join(problems)


# Module names that say which family of timm models a state dict comes from, most specific first.
_FAMILIES = ((('patch_embed', 'blocks', 'dist_token'), 'a distilled DeiT'), (('patch_embed', 'blocks'), 'a ViT/DeiT'),
             (('conv1', 'layer1'), 'a ResNet'), (('stem', 's1'), 'a RegNet'), (('stem', 'stages'), 'a ConvNeXt-like convnet'),
             (('conv_stem', 'blocks'), 'an EfficientNet/MobileNet'), (('patch_embed', 'layers'), 'a Swin'))


def recorded_model(checkpoint) -> Optional[str]:
    """The --model a checkpoint records in its args (ours and the original scripts' do), else None."""
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    model = args.get('model') if isinstance(args, dict) else None
    return model if isinstance(model, str) and model else None


def describe_architecture(state: dict, checkpoint) -> str:
    """What model a checkpoint seems to hold: the --model it records, else its top-level modules and the
    family they suggest."""
    recorded = recorded_model(checkpoint)
    if recorded:
        return f'a {recorded} (its recorded --model)'
    tops = list(dict.fromkeys(k.split('.')[0] for k in state))
    family = next((name for keys, name in _FAMILIES if all(k in tops for k in keys)), 'an unknown model')
    return f'{family} ({", ".join(tops[:6])}{" ..." if len(tops) > 6 else ""})'


def describe_partial_fit(model: torch.nn.Module, state: dict, unset: list, checkpoint, source: str) -> str:
    """One line: how much of ``model`` the checkpoint ``state`` sets, what it leaves unset, what it seems to hold."""
    own = model.state_dict()
    fits = sum(1 for k, v in state.items() if k in own and own[k].shape == v.shape)
    unused = [k for k in state if k not in own]
    return (f'{source} sets {fits} of the model\'s {len(own)} weight tensors and leaves {len(unset)} at random '
            f'(e.g. {", ".join(unset[:3])}); {len(unused)} of its {len(state)} tensors match nothing in the model'
            + (f' (e.g. {", ".join(unused[:3])})' if unused else '')
            + f'; it seems to hold {describe_architecture(state, checkpoint)}')


# The original DeiT III code (models_v2.py) names the two branches of its parallel blocks norm1/norm11,
# attn/attn1, gamma_1/gamma_1_1 (and norm2/norm21, mlp/mlp1, gamma_2/gamma_2_1); timm's
# ParallelThingsBlock keeps them in attns.N / ffns.N, and timm has no converter for these keys.
_PARALLEL_BLOCK_KEYS = {
    'norm1': 'attns.0.norm', 'attn': 'attns.0.attn', 'gamma_1': 'attns.0.ls.gamma',
    'norm11': 'attns.1.norm', 'attn1': 'attns.1.attn', 'gamma_1_1': 'attns.1.ls.gamma',
    'norm2': 'ffns.0.norm', 'mlp': 'ffns.0.mlp', 'gamma_2': 'ffns.0.ls.gamma',
    'norm21': 'ffns.1.norm', 'mlp1': 'ffns.1.mlp', 'gamma_2_1': 'ffns.1.ls.gamma',
}
_BLOCK_KEY = re.compile(r'^(blocks\.\d+\.)([^.]+)(.*)$')  # block prefix, its child's name, the rest
_LAYER_SCALE_KEY = re.compile(r'^blocks\.\d+\.gamma_\d$')


def timm_key_names(state: dict, model: torch.nn.Module) -> dict:
    """``state`` with the key names of the original DeiT III code (``blocks.N.gamma_1``, parallel blocks'
    ``attn1``, ``norm11`` ...) renamed to those of ``model``, a timm ViT; any other state is returned as is."""
    if not isinstance(model, VisionTransformer):  # e.g. CaiT, whose own keys are gamma_1 / gamma_2
        return state
    if any(isinstance(block, ParallelThingsBlock) for block in model.blocks):
        renamed = {}
        for key, value in state.items():
            match = _BLOCK_KEY.match(key)
            if match and match.group(2) in _PARALLEL_BLOCK_KEYS:
                key = match.group(1) + _PARALLEL_BLOCK_KEYS[match.group(2)] + match.group(3)
            renamed[key] = value
        return renamed
    layer_scale = {k: v for k, v in state.items() if _LAYER_SCALE_KEY.match(k)}
    if not layer_scale:
        return state
    # timm's own DeiT III conversion (gamma_N -> lsN.gamma), given only these keys so that it
    # resamples nothing: position embeddings are resized by interpolate_pos_embed, as the original does.
    others = {k: v for k, v in state.items() if k not in layer_scale}
    return {**others, **checkpoint_filter_fn(layer_scale, model, adapt_layer_scale=True)}


def load_state_checked(model: torch.nn.Module, state: dict, source: str, strict: bool = True,
                       checkpoint=None, flag: str = '--model', name: str = ''):
    """``model.load_state_dict`` that reports a foreign checkpoint as one UserError line: with the
    ``checkpoint`` and the model's ``name`` (given by ``flag``), the line names both models and the fix.

    A state in the original DeiT III key layout is renamed first (timm_key_names).
    """
    state = timm_key_names(state, model)
    problems = describe_state_mismatch(model, state, strict)
    if problems:
        built = f' ({flag} {name})' if name else ''
        recorded = recorded_model(checkpoint)
        fix = (f'; it holds a {recorded} (its recorded model): give {flag} {recorded}, or leave {flag} out'
               if recorded and recorded != name else '')
        raise UserError(f'{source} does not fit the model{built}: {problems}{fix}')
    return model.load_state_dict(state, strict=strict)
