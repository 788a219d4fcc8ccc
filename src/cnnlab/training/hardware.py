"""Where and in which precision the pipeline computes, resolved from what the hardware supports.

`resolve_runtime(device="auto", precision="auto")` is the one place that turns params into a
device and a precision. The choice comes from capability checks, never from a timing, so the
same machine always resolves the same way (and gives the same metrics):

* CUDA: bf16 autocast where the GPU supports bf16 (Ampere and later), else fp16 autocast with a
  GradScaler; TF32 matmuls/convolutions as a param.
* CPU: bf16 autocast only where the CPU does bf16 natively (AVX512-BF16 or AMX). Elsewhere
  PyTorch emulates bf16, which trained 5-12x *slower* than fp32 on an AVX2 machine, so fp32.
* Apple ``mps``: fp32 (its autocast is young, and fp32 is what every op supports).

The resolved values are printed when a stage starts and logged as MLflow tags, so runs made on
two machines can be told apart.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from typing import Literal

import torch

from cnnlab.config import RuntimeParams

_log = logging.getLogger(__name__)
Precision = Literal["fp32", "bf16", "fp16"]
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features that decide the precision (x86 only; False elsewhere)."""

    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool
    capability: str  # the SIMD level PyTorch's kernels dispatch to, e.g. "AVX2", "AVX512"

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx


def cpu_features() -> CpuFeatures:
    """What PyTorch itself detects (cpuinfo), so the answer matches the kernels it will run."""
    cpu = torch.cpu
    flag = lambda name: bool(getattr(cpu, name, lambda: False)())  # noqa: E731  (private checks, guarded)
    return CpuFeatures(avx2=flag("_is_avx2_supported"), avx512=flag("_is_avx512_supported"),
                       avx512_bf16=flag("_is_avx512_bf16_supported"), amx=flag("_is_amx_tile_supported"),
                       capability=torch.backends.cpu.get_cpu_capability())


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else Apple's ``mps``, else the CPU. An explicit device that is
    missing is an error that says what to set instead."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not mps_available():
        raise ValueError("device = 'mps' but Apple's Metal backend is not available here; use 'auto' or 'cpu'")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    return torch.device(name)


def resolve_precision(requested: str, device: torch.device) -> tuple[Precision, str]:
    """(precision, why). ``auto`` picks the fastest precision the device runs natively; an explicit
    choice is kept, refused where it cannot run, or kept with a warning where it is emulated."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            return ("bf16", "the GPU supports bf16") if bf16 else ("fp16", "the GPU has no bf16: fp16 + GradScaler")
        if requested == "bf16" and not bf16:
            raise ValueError(f"precision = 'bf16' but {torch.cuda.get_device_name(device)} does not support it; "
                             "use 'auto' (fp16 + GradScaler here) or 'fp32'")
        return requested, "as set"  # type: ignore[return-value]
    if requested == "fp16":
        raise ValueError(f"precision = 'fp16' needs CUDA (device here: {device.type}); use 'auto', 'bf16' or 'fp32'")
    if device.type == "mps":
        fallback = ("ops Metal lacks run on the CPU, with a warning naming each"
                    if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1" else
                    "an op Metal lacks stops the stage: export PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the CPU")
        if requested == "auto":
            return "fp32", f"fp32, the precision every Metal op supports; {fallback}"
        return requested, f"as set; {fallback}"  # type: ignore[return-value]
    native = cpu_features().native_bf16
    if requested == "auto":
        if native:
            return "bf16", "the CPU has native bf16 (AVX512-BF16 or AMX)"
        return "fp32", "the CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would be emulated, far slower"
    if requested == "bf16" and not native:
        _log.warning("precision = 'bf16' on a CPU without native bf16 (no AVX512-BF16 or AMX): PyTorch "
                     "emulates it, which trains several times slower than fp32; 'auto' picks fp32 here")
        return "bf16", "as set; emulated on this CPU"
    return requested, "as set"  # type: ignore[return-value]


@dataclass(frozen=True)
class Runtime:
    """A stage's resolved device and precision (never "auto")."""

    device: torch.device
    precision: Precision
    reason: str  # why this precision, for the start-of-stage line
    channels_last: bool
    tf32: bool  # CUDA only: TF32 for fp32 matmuls and convolutions
    threads: int  # PyTorch's intra-op threads on the CPU

    @property
    def key(self) -> list[str]:
        """What a checkpoint must match to be resumed: a run never continues in another precision."""
        return [self.device.type, self.precision, str(self.channels_last)]

    def describe(self) -> str:
        where = self.device.type
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        tf32 = f", TF32 {'on' if self.tf32 else 'off'}" if self.device.type == "cuda" else ""
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"device {where}, precision {self.precision} ({self.reason}), {layout}{tf32}, {self.threads} threads"

    def params(self) -> dict[str, str]:
        """What the run's ``precision`` and ``device`` params resolved to (never "auto")."""
        return {"precision": self.precision, "device": self.device.type}

    def tags(self) -> dict[str, str]:
        """MLflow tags that tell runs on different machines apart."""
        tags = {"runtime.device": self.device.type, "runtime.precision": self.precision,
                "runtime.channels_last": str(self.channels_last).lower(), "runtime.threads": str(self.threads),
                "runtime.torch": torch.__version__, "runtime.cpu": cpu_name(),
                "runtime.cpu_capability": cpu_features().capability}
        if self.device.type == "cuda":
            tags["runtime.gpu"] = torch.cuda.get_device_name(self.device)
            tags["runtime.tf32"] = str(self.tf32).lower()
        return tags


def resolve_runtime(*, device: str = "auto", precision: str = "auto", channels_last: bool = True,
                    tf32: bool = True) -> Runtime:
    """Resolve params to a `Runtime` and apply its TF32 setting (process-wide, so call this from a
    stage's entry, not at import)."""
    dev = resolve_device(device)
    prec, reason = resolve_precision(precision, dev)
    if dev.type == "cuda":
        set_tf32(tf32)
    return Runtime(device=dev, precision=prec, reason=reason, channels_last=channels_last,
                   tf32=tf32 and dev.type == "cuda", threads=torch.get_num_threads())


def runtime_of(section: RuntimeParams, *, device: str | None = None) -> Runtime:
    """A params section's ``runtime`` resolved on this machine (``device`` overrides its device)."""
    return resolve_runtime(device=device or section.device, precision=section.precision,
                           channels_last=section.channels_last, tf32=section.tf32)


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and cuDNN convolutions on Ampere+ GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def cpu_name() -> str:
    """The CPU's model name where the OS tells it (Linux /proc/cpuinfo, else platform)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
