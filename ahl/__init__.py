"""AHL (Anomaly Heterogeneity Learning, CVPR 2024) on DRA and DevNet: the library behind the DVC pipeline.

``from ahl import load_run, load_exported``: a trained run, or its export (ahl/deploy/api.py). They are imported
when first named, so that ``import ahl`` stays light and load_exported never imports torch."""

import importlib

__version__ = "0.1.0"

_API = {"load_run": "ahl.deploy.api", "load_exported": "ahl.deploy.exported"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ahl' has no attribute {name!r}")
