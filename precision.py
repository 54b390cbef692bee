"""The precision a run computes in: bf16 autocast where the device runs it natively and faster, fp16 with
loss scaling on a GPU without bf16, fp32 elsewhere or with --no-amp.

A CPU's flags do not say whether bf16 pays: with AVX512-BF16 a bf16 matmul runs several times as fast
as fp32 on one CPU and slower on another (no AMX). So on a CPU the choice is measured: a short bf16-vs-fp32 matmul
probe, cached per machine (CPU model and flags, torch version, threads) under ~/.cache/deit.
"""
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# bf16 by default on a CPU only where its matmul is clearly faster: a smaller gain would be eaten by
# the casts and the elementwise work that bf16 does not speed up.
CPU_BF16_MIN_SPEEDUP = 1.5
PROBE_SIZE = 1024  # about deit_tiny's GEMMs (6304 x 192 x 768 at batch 32); a few ms per matmul


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32, no autocast) and why it was chosen."""
    dtype: Optional[torch.dtype]
    reason: str
    warning: str = ''  # a line to print: the choice runs, but not as the user probably expects

    @property
    def name(self) -> str:
        return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[self.dtype]


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    a @ b  # warm-up: oneDNN builds its kernel on the first call
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_bf16_speedup(n: int = PROBE_SIZE, repeats: int = 5) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU (best of ``repeats``, interleaved so that a
    load change hits both)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a.bfloat16(), b.bfloat16()
    fp32 = bf16 = float('inf')
    for _ in range(repeats):
        fp32 = min(fp32, _matmul_seconds(a, b, 1))
        bf16 = min(bf16, _matmul_seconds(a16, b16, 1))
    return fp32 / bf16


def _cpu_identity() -> str:
    """What the probe's answer depends on: CPU model and flags, torch version, threads."""
    model = flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name' and not model:
                    model = value.strip()
                elif key.strip() in ('flags', 'Features') and not flags:
                    flags = value.strip()
    except OSError:
        model = platform.processor()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f'{model or platform.machine()} flags:{digest} torch:{torch.__version__} threads:{torch.get_num_threads()}'


def cache_path() -> Path:
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(root) / 'deit' / 'cpu_bf16_speedup.json'


def cpu_bf16_speedup(measure: Callable[[], float] = measure_cpu_bf16_speedup) -> float:
    """This CPU's bf16 matmul speedup over fp32, from the cache or measured once and cached (a cache that
    cannot be read or written only costs the probe's fraction of a second)."""
    path, key = cache_path(), _cpu_identity()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    speedup = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
        tmp.write_text(json.dumps({**(cached if isinstance(cached, dict) else {}), key: speedup}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return speedup


def default_precision(device: torch.device, cpu_speedup: Callable[[], float] = cpu_bf16_speedup) -> Precision:
    """What a run uses when neither --amp, --no-amp nor --amp-dtype is given."""
    if device.type == 'cuda':
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(torch.bfloat16, 'default on a GPU with native bf16; --no-amp for fp32')
        return Precision(torch.float16, 'default on a GPU without native bf16, with loss scaling; --no-amp for fp32')
    if device.type == 'cpu':
        speedup = cpu_speedup()
        if speedup >= CPU_BF16_MIN_SPEEDUP:
            return Precision(torch.bfloat16, f'default: a bf16 matmul runs {speedup:.3g}x as fast as fp32 on this '
                                             'CPU; --no-amp for fp32')
        return Precision(None, f'default: a bf16 matmul runs only {speedup:.3g}x as fast as fp32 on this CPU '
                               f'(bf16 from {CPU_BF16_MIN_SPEEDUP}x); --amp for bf16 anyway')
    return Precision(None, f'default on {device.type}')


def resolve_precision(amp: Optional[bool], amp_dtype: Optional[str], device: torch.device,
                      cpu_speedup: Callable[[], float] = cpu_bf16_speedup) -> Precision:
    """The precision of --amp / --no-amp / --amp-dtype (None: not given); explicit flags win over the default."""
    if amp is False:
        return Precision(None, '--no-amp')
    if amp_dtype:
        return Precision(getattr(torch, amp_dtype), f'--amp-dtype {amp_dtype}', emulated_bf16_warning(amp_dtype, device))
    if amp:
        # bf16 needs no loss scaling; fp16 only where the hardware lacks bf16 (a GPU before Ampere)
        native_bf16 = device.type != 'cuda' or torch.cuda.is_bf16_supported(including_emulation=False)
        return Precision(torch.bfloat16 if native_bf16 else torch.float16, '--amp')
    return default_precision(device, cpu_speedup)


def emulated_bf16_warning(amp_dtype: str, device: torch.device) -> str:
    """'' unless bf16 is asked for on a GPU without bf16 tensor cores (before Ampere), where torch emulates
    it: slower than fp16, and than fp32 for some kernels."""
    if amp_dtype != 'bfloat16' or device.type != 'cuda' or torch.cuda.is_bf16_supported(including_emulation=False):
        return ''
    major, minor = torch.cuda.get_device_capability(device)
    return (f'--amp-dtype bfloat16 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): '
            f'no native bf16 before 8.0, so it is emulated and slow; --amp-dtype float16 is the fast mixed '
            f'precision of this GPU')


def dtype_flag(dtype: Optional[torch.dtype]) -> Optional[str]:
    """The --amp-dtype value of an autocast dtype (None for fp32: no autocast)."""
    return str(dtype).removeprefix('torch.') if dtype is not None else None
