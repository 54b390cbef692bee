"""torch.hub entry points: one per model of timm's DeiT family and one per model of models/.

    model = torch.hub.load('/path/to/deit', 'deit_tiny_distilled_patch16_224', source='local', pretrained=True)

``pretrained=True`` loads the official weights whose URL the model's pretrained config keeps
(timm's ``pretrained_cfg['url']``), downloaded once into the torch.hub cache and hash-checked
against the ``name-<sha256 prefix>.pth`` file name. Other keyword arguments (``num_classes``,
``img_size``, ``drop_path_rate``, ``pretrained_cfg_overlay`` ...) go to ``timm.create_model``.
"""
# Only modules and underscore names at the top level: torch.hub lists every other callable here
# as an entry point.
import collections.abc as _abc

import timm
import timm.models.vision_transformer as _vit
import torch

import models  # registers our models in timm's registry
import utils
import weights

dependencies = ['torch', 'timm']

_TIMM_DEIT_MODULE = 'timm.models.deit'  # DeiT and DeiT III


def _hub_model_names() -> list[str]:
    """Registered models whose entrypoint lives in timm's DeiT module or in our models/ package."""
    def ours_or_deit(name: str) -> bool:
        module = timm.models.model_entrypoint(name).__module__
        return module == _TIMM_DEIT_MODULE or module.startswith(f'{models.__name__}.')
    return [name for name in timm.list_models() if ours_or_deit(name)]


def _load_official_weights(model: torch.nn.Module, name: str) -> None:
    """The weights at the model's pretrained-config URL, loaded with strict key checking."""
    url = getattr(model, 'pretrained_cfg', {}).get('url')
    if not url:
        raise utils.UserError(f'{name} has no official weights (no url in its pretrained config): '
                              'use pretrained=False')
    state = weights.model_state_from_checkpoint(weights.load_checkpoint(url), url)
    if isinstance(model, _vit.VisionTransformer):
        # DeiT III's original key names (blocks.N.gamma_1, parallel blocks' attn1 ...) renamed, then
        # timm's own filter for DeiT weights resizes pos_embed to an img_size other than the weights' own.
        state = _vit.checkpoint_filter_fn(weights.timm_key_names(state, model), model)
    weights.load_state_checked(model, state, url)


def _entrypoint(name: str) -> _abc.Callable[..., torch.nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs) -> torch.nn.Module:
        # timm must not fetch weights itself: its default source is the Hugging Face hub.
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained:
            _load_official_weights(model, name)
        return model

    summary = (timm.models.model_entrypoint(name).__doc__ or name).strip().splitlines()[0]
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (f'{summary}\n\npretrained=True: the official weights of its pretrained config '
                          '(hash-checked); **kwargs go to timm.create_model.')
    return entrypoint


for _name in _hub_model_names():
    globals()[_name] = _entrypoint(_name)
