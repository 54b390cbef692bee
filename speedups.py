"""Speed settings shared by main.py and benchmark.py: torch.compile with a fallback, fused optimizers,
the attention kernel, malloc."""
import ctypes
import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def compiler_problem(device_type: str = 'cpu') -> str:
    """'' when torch.compile works on ``device_type`` here, else why not (probed once per device type on
    a tiny graph, forward and backward).

    Inductor compiles lazily, so a missing C++ compiler (CPU) or a broken Triton (CUDA) would
    otherwise surface mid-training, at the first backward; a probe finds it before the run starts.
    """
    try:
        x = torch.ones(4, device=device_type, requires_grad=True)
        torch.compile(lambda t: (t * 2).sin().sum())(x).backward()
        return ''
    except Exception as e:  # torch._dynamo / inductor errors: no compiler, unsupported platform, ...
        text = str(e).strip().splitlines()
        return f'{type(e).__name__}: {text[0] if text else ""}'


def compile_or_eager(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``torch.compile(model)``, or ``model`` itself with one line saying why it cannot be compiled on
    the device that holds its parameters."""
    first = next(model.parameters(), None)
    problem = compiler_problem(first.device.type if first is not None else 'cpu')
    if problem:
        print(f'warning: --compile: torch.compile is unavailable here ({problem}); the {name} runs eager')
        return model
    return torch.compile(model)


def optimizer_kwargs(device: torch.device, opt: str = 'adamw') -> dict:
    """Extra arguments for timm's create_optimizer_v2: torch's fused Adam/AdamW kernel where it exists.

    Fused runs the whole update in one kernel per parameter group instead of a Python loop over
    tensors (torch's default on the CPU) or several multi-tensor passes (its default on CUDA).
    """
    if opt.lower() in ('adam', 'adamw') and device.type in ('cpu', 'cuda'):
        return {'fused': True}
    return {}


def unfuse_cpu_bf16_attention(model: torch.nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype]) -> int:
    """On a CPU under bf16 autocast, switch timm's attention layers (``fused_attn``) to their unfused
    path (``q @ k^T``, softmax, ``@ v``); returns how many were switched.

    torch's fused CPU attention kernel runs bf16 at a fraction of the rate its GEMMs reach, where the
    unfused path's two batched matmuls run at it (benchmark.py --breakdown shows both). Elsewhere,
    fp32 included, the fused kernel stays: --no-amp keeps its numbers bit for bit.
    """
    if device.type != 'cpu' or amp_dtype != torch.bfloat16:
        return 0
    layers = [m for m in model.modules() if getattr(m, 'fused_attn', None) is True]
    for layer in layers:
        layer.fused_attn = False
    return len(layers)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


_kept = False  # whether keep_freed_memory is in force in this process (inherited by forked workers)


def keep_freed_memory_for(device: torch.device) -> bool:
    """keep_freed_memory where it pays: a run on the CPU, whose large activations (a CPU teacher) are
    allocated in host memory. On a GPU the host allocates little, and kept memory would only hold
    the peak of every process."""
    return device.type == 'cpu' and keep_freed_memory()


def release_kept_memory() -> None:
    """In a forked data worker: glibc returns freed memory again if the trainer kept it (a worker's
    buffers are small; kept memory, times the workers of every rank, is not)."""
    if _kept:
        keep_freed_memory(False)


def keep_freed_memory(keep: bool = True) -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS; returns whether it applied.

    Buffers above glibc's mmap threshold (32 MiB at most, e.g. a RegNetY-16GF activation of 360 MiB
    at batch 32) are mmapped and unmapped on every allocation, and the pages are faulted in again
    at each use: on the CPU that costs the teacher as much time as some of its convolutions.
    ``keep`` serves every allocation from the heap and never trims it (the same as
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<huge>``, set at run time;
    -1 disables trimming, mallopt(3)):
    the resident memory then stays at its peak. ``keep=False`` restores glibc's steady state for
    large buffers (mmap from 32 MiB, trim above 64 MiB), for baselines.
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    global _kept
    _kept = keep
    if keep:
        return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))
    return bool(mallopt(_M_MMAP_MAX, 65536) and mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)
                and mallopt(_M_TRIM_THRESHOLD, 64 * 2 ** 20))
