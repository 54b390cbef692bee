"""A trained model ready to run on new images: built from a checkpoint of a run (or an official or original
one, or a timm hub name), with the input size, eval crop and class names it was trained with.

Used by predict.py, export.py's ONNX export and tools/eval_table.py; main.py builds its students with
``create_model`` too.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import timm
import torch

import models  # noqa: F401  (registers our students in timm's registry)
import utils
import weights
from datasets import imagenet_descriptions
from utils import UserError


@dataclass
class TrainedModel:
    """A model in eval mode on the CPU, and what its images and outputs need."""
    model: torch.nn.Module
    name: str  # timm model name
    input_size: int
    eval_crop_ratio: float
    classes: List[str]  # class names in output order (ImageNet: synset ids)
    descriptions: Optional[List[str]]  # human-readable class names where known (ImageNet's)

    def label(self, index: int) -> str:
        """What a user reads for output ``index``: its description where there is one, else its class name."""
        return self.descriptions[index] if self.descriptions else self.classes[index]


def create_model(name: str, num_classes: int, input_size: Optional[int], **kwargs) -> torch.nn.Module:
    """``timm.create_model`` for ``input_size`` where the architecture takes an image size (None: its own)."""
    if input_size is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    try:
        return timm.create_model(name, num_classes=num_classes, img_size=input_size, **kwargs)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name, num_classes=num_classes, **kwargs)  # e.g. convnets: any input size


def is_hub_name(source: str) -> bool:
    """A timm model name (with an optional pretrained tag, 'deit_tiny_patch16_224.fb_in1k'), not a file or URL."""
    return not os.path.exists(source) and not utils.is_url(source) and timm.is_model(source)


def load_trained_model(source: str, model_name: str = '', ema: bool = False,
                       input_size: Optional[int] = None) -> TrainedModel:
    """The model of a checkpoint file or URL (``model_name``, else the one its run recorded; ``input_size``,
    else the one its run recorded), or the pretrained weights of a timm hub name with ImageNet's classes."""
    if is_hub_name(source):
        return hub_model(source)
    checkpoint = weights.load_checkpoint(source)
    run_args = (checkpoint.get('args') or {}) if isinstance(checkpoint, dict) else {}
    name = model_name or run_args.get('model') or ''
    if not name:
        raise UserError(f'{source} does not record its model: give --model NAME')
    if not timm.is_model(name):
        raise UserError(f'unknown model {name}: use a timm model name')
    state = weights.model_or_ema_state(checkpoint, source, ema)
    num_classes = head_classes(state) or run_args.get('nb_classes') or 1000
    input_size = input_size or run_args.get('input_size')
    model = create_model(name, num_classes, input_size)
    weights.load_state_checked(model, state, source)
    classes, descriptions = checkpoint_classes(checkpoint, num_classes)
    return TrainedModel(model.eval(), name, input_size or model_input_size(model),
                        float(run_args.get('eval_crop_ratio', 0.875)), classes, descriptions)


def hub_model(name: str) -> TrainedModel:
    """timm's pretrained weights of ``name`` (downloaded by timm), with the classes of its ImageNet subset."""
    from timm.data import ImageNetInfo, infer_imagenet_subset
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # no network, no weights for that tag, a broken cache
        raise UserError(f'cannot load the pretrained weights of {name}: {utils.first_line(e)}') from None
    subset = infer_imagenet_subset(model)
    if subset:
        info = ImageNetInfo(subset)
        classes, descriptions = info.label_names(), info.label_descriptions()
    else:
        classes, descriptions = [str(i) for i in range(model.num_classes)], None
    return TrainedModel(model.eval(), name, model_input_size(model),
                        float(model.pretrained_cfg.get('crop_pct', 0.875)), classes, descriptions)


def head_classes(state: dict) -> Optional[int]:
    """The class count of a state dict's classifier (``head.weight``), where it has one."""
    head = state.get('head.weight')
    return int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None


def model_input_size(model: torch.nn.Module) -> int:
    """The image size a model was built for (a ViT's patch grid), else its pretrained config's."""
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    if img_size:
        return int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    return int(model.pretrained_cfg.get('input_size', (3, 224, 224))[-1])


def checkpoint_classes(checkpoint: dict, num_classes: int):
    """(class names, descriptions) a checkpoint recorded; for one without them (the official and original
    checkpoints), ImageNet-1k's when it has 1000 classes, else the class indices."""
    classes = checkpoint.get('classes') if isinstance(checkpoint, dict) else None
    if classes and len(classes) == num_classes:
        return list(classes), checkpoint.get('class_descriptions') or imagenet_descriptions(list(classes))
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo('imagenet-1k')
        return info.label_names(), info.label_descriptions()
    return [str(i) for i in range(num_classes)], None
