"""Write the model weights of a checkpoint as .safetensors, loadable by timm, or the model as ONNX.

    python export.py output/run/checkpoint.pth -o model.safetensors [--ema]
    python export.py output/run/checkpoint.pth --onnx model.onnx [--check-images DIR]

ONNX: see onnx_export.py (dynamic batch, opset 18, checked with onnxruntime before it is written).

The file holds the state dict of the model (or, with --ema, of the EMA model) under timm's key
names, with the model name, class count and input size as metadata. timm loads it with (after
``import models`` for a model of models/, as the printed lines do):

    timm.create_model(NAME, pretrained=True,
                      pretrained_cfg_overlay=dict(file='model.safetensors', num_classes=N))

(``num_classes`` in the overlay too: when it differs from the pretrained config's own class count,
timm drops the classifier weights and keeps a random head; ``mean`` and ``std`` too when the run's
normalisation, --mean/--std, differs from the model's pretrained config: timm's resolve_data_config then
preprocesses as the run did.)
"""
import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import safetensors.torch
import timm
import torch

import inference
import models  # noqa: F401  (registers our models, whose default input size load_hint reads)
import onnx_export
import predict
import utils
import weights
from utils import UserError

REPO = Path(__file__).resolve().parent


def weights_to_export(checkpoint: dict, path: str, ema: bool) -> Dict[str, torch.Tensor]:
    """The model (or EMA) state dict of a checkpoint, as tensors safetensors can store."""
    state = weights.model_or_ema_state(checkpoint, path, ema)
    # safetensors refuses non-contiguous tensors and tensors that share memory (views, tied weights):
    # every tensor gets its own contiguous copy.
    return {k: v.detach().to('cpu', copy=True).contiguous() for k, v in state.items()}


def export_metadata(checkpoint: dict, state: Dict[str, torch.Tensor], ema: bool) -> Dict[str, str]:
    """String metadata (all safetensors allows): model name, input size and normalisation from the run's args."""
    args = checkpoint.get('args') or {}
    metadata = {'format': 'pt', 'weights': 'ema' if ema else 'model'}  # 'format': what timm/HF tools expect
    if args.get('model'):
        metadata['model'] = str(args['model'])
    if args.get('input_size'):
        metadata['input_size'] = str(args['input_size'])
    for key in ('mean', 'std'):
        if args.get(key):
            metadata[key] = ','.join(str(float(v)) for v in args[key])
    num_classes = args.get('nb_classes') or num_classes_of(state)
    if num_classes:
        metadata['num_classes'] = str(num_classes)
    return metadata


def num_classes_of(state: Dict[str, torch.Tensor]) -> Optional[int]:
    head = state.get('head.weight')
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    """Write a .safetensors file atomically (utils.write_atomic): never a torn file."""
    # safetensors.torch.save (bytes) rather than save_file: save_file creates the file with mode
    # 0600 whatever the umask, unlike the checkpoints beside it.
    data = safetensors.torch.save(tensors, metadata=metadata)
    utils.write_atomic(path, lambda f: f.write(data))


def export(checkpoint_path: str, output: str, ema: bool = False) -> Dict[str, str]:
    """Write the checkpoint's weights to ``output``; returns the metadata written."""
    if not output.endswith('.safetensors'):
        raise UserError(f'-o {output}: the name must end in .safetensors (timm picks the format by suffix)')
    checkpoint = weights.load_checkpoint(checkpoint_path)
    state = weights_to_export(checkpoint, checkpoint_path, ema)
    metadata = export_metadata(checkpoint, state, ema)
    try:
        save_safetensors_atomic(state, output, metadata)
    except OSError as e:
        raise UserError(f'cannot write {output}: {e.strerror or e}') from None
    return metadata


def load_hint(output: str, metadata: Dict[str, str]) -> str:
    """The Python lines that load the exported file, for the user to copy: they run as printed in a fresh
    interpreter, from any directory (absolute paths; our models/ registered in timm first)."""
    name = metadata.get('model', 'MODEL_NAME')
    num_classes = metadata.get('num_classes', 'NUM_CLASSES')
    lines = []
    if timm.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith('models.'):
        lines.append(f"import sys; sys.path.insert(0, {str(REPO)!r}); import models  "
                     f"# registers {name} (models/ of this repository) in timm")
    lines.append('import timm')
    lines.append(f"model = timm.create_model('{name}', pretrained=True{img_size_argument(name, metadata)}, "
                 f"pretrained_cfg_overlay=dict(file={os.path.abspath(output)!r}, num_classes={num_classes}"
                 f"{normalisation_overlay(name, metadata)}))")
    return '\n'.join(lines)


def normalisation_overlay(name: str, metadata: Dict[str, str]) -> str:
    """', mean=(...), std=(...)' when the run's normalisation is not the model's pretrained config's."""
    cfg = timm.models.get_pretrained_cfg(name)
    own = {key: tuple(float(v) for v in metadata[key].split(',')) for key in ('mean', 'std') if key in metadata}
    if len(own) < 2 or (cfg is not None and (tuple(cfg.mean), tuple(cfg.std)) == (own['mean'], own['std'])):
        return ''
    return f", mean={own['mean']}, std={own['std']}"


def img_size_argument(name: str, metadata: Dict[str, str]) -> str:
    """', img_size=N' when a fixed-size model (a ViT) was trained at another size than its default."""
    cfg = timm.models.get_pretrained_cfg(name)
    size = metadata.get('input_size')
    if cfg is None or not cfg.fixed_input_size or size is None or int(size) == cfg.input_size[-1]:
        return ''
    return f', img_size={size}'


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------

CHECK_IMAGES = 32  # real images the ONNX check runs: enough to cover the range of real activations


def check_image_paths(check_images: List[str], checkpoint_path: str) -> List[str]:
    """--check-images, else the validation folder of the checkpoint's run where it still exists."""
    if check_images:
        return predict.expand_paths(check_images)
    if inference.is_hub_name(checkpoint_path):
        return []
    data_path = weights.recorded_args(checkpoint_path).get('data_path') or ''
    val = os.path.join(str(data_path), 'val')
    return predict.expand_paths([val]) if data_path and os.path.isdir(val) else []


def real_batches(paths: List[str], trained: inference.TrainedModel) -> List[torch.Tensor]:
    """Up to CHECK_IMAGES of ``paths`` as the evaluation pipeline makes them (unreadable ones skipped)."""
    loader = predict.prediction_loader(paths[:CHECK_IMAGES], trained, batch_size=8, num_workers=0,
                                       device=torch.device('cpu'), fast=True)
    return [images for images, _, _ in itertools.islice(loader, CHECK_IMAGES // 8) if len(images)]


def export_onnx(checkpoint_path: str, output: str, model_name: str, ema: bool, check_images: List[str],
                opset: int) -> float:
    """The checkpoint's model (its averaged heads if distilled) written to ``output`` as checked ONNX."""
    trained = inference.load_trained_model(checkpoint_path, model_name, ema)
    paths = check_image_paths(check_images, checkpoint_path)
    if not paths:
        print('note: no real images to check the ONNX graph on (no --check-images, and the run\'s val/ is not '
              'here): checking on a random batch only')
    return onnx_export.export_onnx(trained.model, output, trained.input_size, real_batches(paths, trained), opset)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python export.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help="checkpoint file or https URL ({'model': state_dict, ...} or a state dict)")
    parser.add_argument('-o', '--output', default='', help='the .safetensors file to write')
    parser.add_argument('--onnx', default='', metavar='FILE.onnx', help='write the model as ONNX, checked with '
                        f'onnxruntime (dynamic batch, opset {onnx_export.OPSET})')
    parser.add_argument('--ema', action='store_true', help="export the EMA weights ('model_ema')")
    parser.add_argument('--model', default='', help='ONNX: timm model name (default: the one the checkpoint records)')
    parser.add_argument('--check-images', nargs='+', default=[], metavar='PATH',
                        help=f'ONNX: images, folders or globs to compare on (the first {CHECK_IMAGES}; default: '
                             f'the val/ folder of the checkpoint\'s run, if here)')
    parser.add_argument('--opset', default=onnx_export.OPSET, type=int,
                        help=f'ONNX: opset version (default: {onnx_export.OPSET})')
    return parser


def cli(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.output and not args.onnx:
        parser.error('give -o FILE.safetensors, --onnx FILE.onnx, or both')
    try:
        if args.output:
            metadata = export(args.checkpoint, args.output, args.ema)
            hint = load_hint(args.output, metadata).replace('\n', '\n  ')
            print(f"wrote {args.output} ({metadata['weights']} weights); load it in Python with:\n  {hint}")
        if args.onnx:
            export_onnx(args.checkpoint, args.onnx, args.model, args.ema, args.check_images, args.opset)
            print(f'wrote {args.onnx} (input "images" N x 3 x S x S normalised as evaluation, output "logits"; '
                  f'opset {args.opset})')
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
