"""Run-time choices passed explicitly (never global): the device, progress bars, logging."""

from __future__ import annotations

import logging
import sys

import torch

from ahl.errors import UserError


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


def show_progress() -> bool:
    """Progress bars only for a person watching a terminal (not in tests, CI logs or pipes)."""
    return sys.stderr.isatty()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
