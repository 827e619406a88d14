"""Run-time choices passed explicitly (never global): the device and its numeric settings.

``RuntimeConfig`` is params.yaml's ``runtime`` section: bfloat16 autocast, channels_last, torch.compile and the
determinism switches. ``Runtime`` is that section resolved for one device; library functions take it as an
argument (``None`` = float32, contiguous, eager: the CPU defaults, bit-identical to running without it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from ahl.core.errors import UserError

log = logging.getLogger(__name__)

AUTOCAST = ("auto", "bfloat16", "float32")
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic results (PyTorch's reproducibility notes)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:1`` ... as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"params.yaml: device = {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"params.yaml: device = {name!r} but CUDA is not available here; use device: auto or cpu")
    return device


@dataclass(frozen=True)
class RuntimeConfig:
    """How the device computes (params.yaml ``runtime``); none of it changes what is computed on CPU by default."""

    autocast: str = "auto"  # auto: float32 (TF32 matmuls on CUDA) | bfloat16 (CPU too) | float32
    channels_last: bool | str = "auto"  # auto: on CUDA only | true | false (the backbone's memory format)
    compile: bool = False  # torch.compile the backbone (base training, caching, image scoring)
    deterministic: bool = False  # torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG (process-wide)
    cudnn_benchmark: bool = False  # cuDNN autotunes conv kernels per input shape (process-wide)

    def __post_init__(self) -> None:
        if self.autocast not in AUTOCAST:
            raise UserError(
                f"params.yaml: runtime.autocast must be one of {', '.join(AUTOCAST)}; got {self.autocast!r}"
            )
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            raise UserError(
                f"params.yaml: runtime.channels_last must be auto, true or false; got {self.channels_last!r}"
            )
        if self.deterministic and self.cudnn_benchmark:
            raise UserError(
                "params.yaml: runtime.deterministic and runtime.cudnn_benchmark exclude each other (autotuning picks "
                "kernels by timing); set cudnn_benchmark: false"
            )


@dataclass(frozen=True)
class Runtime:
    """A device and how to compute on it: the autocast dtype (None = float32), channels_last, compile."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def resolve(cls, device: torch.device | str, config: RuntimeConfig) -> Runtime:
        """``config`` for ``device``. ``autocast: auto`` is float32 everywhere (TF32 matmuls on CUDA, see
        ``configure_tf32``): bfloat16 is an option only, for it lowered DRA on ELPV (docs/deviations.md);
        ``channels_last: auto`` is on for CUDA only."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        autocast = "float32" if config.autocast == "auto" else config.autocast
        if config.autocast == "auto":
            log.debug("runtime.autocast: auto -> float32 on %s%s", device, " (TF32 matmuls)" if cuda else "")
        channels_last = cuda if config.channels_last == "auto" else bool(config.channels_last)
        dtype = torch.bfloat16 if autocast == "bfloat16" else None
        return cls(device, dtype, channels_last, config.compile)

    def describe(self) -> dict:
        """What a result computed under this runtime records (thresholds.json, an export's metadata): the device,
        the autocast dtype, the memory format, compile, and the process-wide switches in force now (TF32 matmuls
        and convolutions, cuDNN autotuning, deterministic algorithms), for these change scores on CUDA too."""
        cuda = self.device.type == "cuda"
        return {
            "device": str(self.device), "dtype": str(self.dtype or torch.float32).removeprefix("torch."),
            "channels_last": self.channels_last, "compile": self.compile,
            "tf32_matmul": cuda and torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": cuda and torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": cuda and torch.backends.cudnn.benchmark,
            "deterministic": torch.are_deterministic_algorithms_enabled(), "torch": torch.__version__,
        }  # fmt: skip

    def autocast(self) -> AbstractContextManager:
        """Autocast to ``dtype`` for forward passes (a no-op in float32); backward runs outside it."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` (in place) in channels_last and compiled, as asked; its state_dict keys are unchanged."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if self.compile:
            module.compile()  # nn.Module.compile: in place, so checkpoints keep their parameter names
        return module

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) batch in the memory format the prepared modules expect."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def plain(device: torch.device | str) -> Runtime:
    """float32, contiguous, eager on ``device``: what every library function does when given no Runtime."""
    return Runtime(torch.device(device))


def configure_tf32(runtime: Runtime) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (process-wide; a stage or `ahl predict` calls this once):
    what ``autocast: auto`` means there. Nothing changes on the CPU or under bfloat16 autocast."""
    if runtime.device.type == "cuda" and runtime.dtype is None:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def configure_determinism(config: RuntimeConfig) -> None:
    """The process-wide switches of ``config`` (a stage calls this once, before any CUDA work). With the defaults
    nothing is changed. ``deterministic`` makes CUDA runs bitwise repeatable on the same GPU and software (ops
    without a deterministic kernel warn); it costs speed (cuBLAS workspace, no autotuning)."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif config.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside the block and restored after it: the CPU one and
    every initialised CUDA device's (torch.manual_seed seeds them all), so no state leaks out on either."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

