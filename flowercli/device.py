"""Where and how the tensors are computed: device, autocast precision, Adam implementation, threads.

Every stage resolves its `--device`, `--precision`, `--adam` and `--threads` here, so each accepts
the same values and refuses a bad one with the same message. None of these choices changes what
is computed beyond float rounding.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flowercli.errors import InputError

DEVICES = "auto, cpu, cuda or cuda:N"
ADAM_IMPLS = ("forloop", "foreach", "fused")


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; 'auto' is the first GPU when there is one."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise InputError(f"unknown device {name!r}: use {DEVICES}")
    if not torch.cuda.is_available():
        raise InputError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; "
                         "use --device cpu (or auto)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; pick one of them")
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where the CPU executes bf16 natively (AVX-512 BF16 instructions, and torch uses AVX-512).

    The stricter of two tests: oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) also
    says yes on AVX-512 CPUs without the BF16 instructions (and on some AVX2 ones), where bf16 is
    converted in software; bf16 autocast without the instructions was 5-30x slower than fp32 in
    docs/BENCHMARKS.md. The flag list is read from /proc/cpuinfo (Linux); elsewhere `auto` keeps fp32.
    """
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    try:
        return "avx512_bf16" in cpuinfo.read_text()
    except OSError:
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto`: bf16 on CUDA and on CPUs with native bf16."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise InputError(f"unknown precision {name!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or nothing for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def adam_flags(adam: str) -> dict[str, bool]:
    """torch.optim.Adam's keyword flags for one implementation (forloop | foreach | fused)."""
    if adam not in ADAM_IMPLS:
        raise InputError(f"unknown Adam implementation {adam!r}; choose forloop, foreach or fused")
    return {"foreach": adam == "foreach", "fused": adam == "fused"}


def resolve_adam(name: str, device: torch.device) -> str:
    """The Adam implementation; `auto`: fused (one kernel per parameter, on CPU and CUDA alike).

    On the 2-core AVX2 CPU, both optimisers' steps took 8 ms fused vs 16 ms for-loop or foreach
    (2 threads, quiet machine), 16 vs 73 ms at 1 thread (bench/train_speed.py "parts").
    """
    if name == "auto":
        return "fused"
    adam_flags(name)  # validates
    return name


def resolve_threads(n: int) -> int:
    """torch intra-op threads for the run; 0 keeps torch's default (one per physical core).

    Not chosen from the machine's load: the thread count changes float rounding (CPU results are
    bit-exact only for the same count), and a seed must repeat a run. On a machine whose cores are
    busy with other work, fewer threads than cores is faster (bench/train_speed.py measures it).
    """
    if n < 0:
        raise InputError(f"--threads must be 0 (torch's default) or more, got {n}")
    return n or torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` for the block, and restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@dataclass(frozen=True)
class StepOptions:
    """How a training step is executed. None of these change what it computes beyond float rounding."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    # One D forward over [real; mismatched; fake] instead of three. Only valid without BatchNorm in D
    # (BatchNorm would mix the statistics of the three parts).
    one_d_forward: bool = True
    world: int = 1
