"""ONNX export of a trained model (``python export.py CKPT --onnx model.onnx``), checked against PyTorch.

The graph takes ``images`` (N x 3 x S x S, float32, normalised as the evaluation transform leaves them;
N dynamic) and returns ``logits`` (N x classes); a distilled DeiT returns its two heads averaged, as it
does in evaluation. It is written by torch's exporter (``torch.onnx.export(..., dynamo=True)``, via
torch.export and onnxscript: the TorchScript exporter is deprecated since torch 2.9 and warns that it
will be removed) at ONNX opset ``OPSET`` (LayerNormalization needs 17; TensorRT 10, OpenVINO and
onnxruntime read 18). Before the file is put in place, onnxruntime runs it on a random batch and on
real images: the largest absolute difference to the PyTorch model's logits is printed, and above
``TOLERANCE`` the export fails with it and writes nothing.
"""
import os
from typing import Iterable, List

import numpy as np
import torch

import utils
from utils import UserError

OPSET = 18
TOLERANCE = 1e-4  # fp32 logits: onnxruntime's kernels sum in another order than PyTorch's, ~1e-6 apart


def write_onnx(model: torch.nn.Module, path: str, input_size: int, opset: int = OPSET) -> None:
    """Export ``model`` (eval mode, fp32, CPU) to ``path`` with a dynamic batch dimension."""
    if torch.__version__ < (2, 6):  # a TorchVersion: compares as a version
        raise UserError(f'ONNX export needs torch >= 2.6 (its torch.export-based exporter); this is torch '
                        f'{torch.__version__}')
    example = torch.randn(2, 3, input_size, input_size)  # 2, not 1: torch.export specialises a size of 1
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=['images'],
                                    output_names=['logits'], dynamic_shapes=({0: torch.export.Dim('batch')},),
                                    verbose=False)
    except ImportError as e:  # onnxscript or onnx missing
        raise UserError(f'ONNX export needs the onnx and onnxscript packages ({e}): '
                        f'python -m pip install -r requirements.txt -c constraints.txt') from None
    program.save(path)


def max_abs_difference(path: str, model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """The largest absolute difference between onnxruntime's and ``model``'s logits over ``batches``."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    largest = 0.0
    with torch.inference_mode():
        for images in batches:
            expected = model(images).float().numpy()
            got = session.run(['logits'], {'images': images.numpy()})[0]
            if got.shape != expected.shape:
                raise UserError(f'the exported graph returns shape {got.shape}, the model {expected.shape}')
            largest = max(largest, float(np.abs(got - expected).max()))
    return largest


def export_onnx(model: torch.nn.Module, output: str, input_size: int, real_batches: List[torch.Tensor],
                opset: int = OPSET, tolerance: float = TOLERANCE) -> float:
    """Write ``model`` to ``output`` as ONNX once onnxruntime matches it within ``tolerance`` on a random
    batch of 3 (another size than the export's example: the batch is dynamic) and on ``real_batches``;
    returns the largest difference. Above the tolerance nothing is written and a UserError names it."""
    model = model.float().eval().cpu()
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise UserError(f'--onnx {output}: folder {directory} does not exist')
    tmp = os.path.join(directory, f'.{os.path.basename(output)}.tmp{os.getpid()}')
    try:
        write_onnx(model, tmp, input_size, opset)
        random_batch = torch.randn(3, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        difference = max_abs_difference(tmp, model, [random_batch, *real_batches])
        real = sum(len(b) for b in real_batches)
        print(f'ONNX check, onnxruntime vs PyTorch in fp32 on 3 random and {real} real images: '
              f'max abs difference of the logits {difference:.3g} (tolerance {tolerance:g})')
        if not difference <= tolerance:  # NaN fails too
            raise UserError(f'the ONNX graph differs from the PyTorch model by {difference:.3g} '
                            f'(more than {tolerance:g}): nothing written to {output}')
        os.replace(tmp, output)
    except OSError as e:
        raise UserError(f'cannot write {output}: {e.strerror or e}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return difference
