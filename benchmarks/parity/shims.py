"""Run the authors' official code (DRA, DevNet, AHL) from a user's checkout, with run-time shims only.

Nothing of the official code is copied into this repository: every function here takes the path of a checkout
(common.check_checkout finds it), imports from it, and patches in memory what cannot run here (CUDA calls on a CPU
machine, the backbone builder, the order of ``os.listdir``, the torch-2 ``detect_anomaly`` switch, a missing
``einops``). Each patch is undone when its ``Patches`` context ends, so the same process can run ours and theirs
side by side.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# Reversible patches


class Patches:
    """setattr/setitem that remember the old value; ``restore()`` (or leaving the ``with``) undoes them in
    reverse order."""

    _MISSING = object()

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = obj.__dict__.get(name, self._MISSING) if isinstance(obj, type) else getattr(obj, name, self._MISSING)

        def undo() -> None:
            if old is self._MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        setattr(obj, name, value)
        self._undo.append(undo)

    def setitem(self, mapping: dict, key: Any, value: Any) -> None:
        old = mapping.get(key, self._MISSING)

        def undo() -> None:
            if old is self._MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        mapping[key] = value
        self._undo.append(undo)

    def call_on_restore(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


# --------------------------------------------------------------------------------------------------------------
# Importing from a checkout

# Top-level names the three official repositories use; they collide between the repositories (each has its own
# ``modeling`` package), so they are dropped from sys.modules before and after importing from a checkout.
OFFICIAL_TOP_LEVEL = ("modeling", "datasets", "dataloaders", "utils", "main", "train", "einops")


def _purge(root: Path | None = None) -> None:
    for name in list(sys.modules):
        top = name.split(".", 1)[0]
        if top not in OFFICIAL_TOP_LEVEL:
            continue
        module = sys.modules[name]
        file = getattr(module, "__file__", None)
        stub = getattr(module, "__parity_stub__", False)
        if stub or file is None or root is None or Path(file).resolve().is_relative_to(root):
            del sys.modules[name]


def _einops_stub() -> types.ModuleType:
    """``einops.rearrange`` for pure permutations ('a b c -> c a b'), the only use the official AHL code makes
    of einops; installed only when the real package is missing."""
    module = types.ModuleType("einops")
    module.__parity_stub__ = True

    def rearrange(x, pattern: str):
        left, right = (side.split() for side in pattern.split("->"))
        if sorted(left) != sorted(right) or len(left) != len(set(left)):
            raise NotImplementedError(f"einops stub: only permutations are supported, got {pattern!r}")
        return x.permute(*[left.index(a) for a in right])

    module.rearrange = rearrange
    return module


@contextlib.contextmanager
def official_path(root: Path) -> Iterator[None]:
    """Import from ``root`` (its top-level packages first on sys.path), cleanly separated from the other
    checkouts. Modules imported inside stay usable after the context ends."""
    root = Path(root).resolve()
    _purge()
    sys.path.insert(0, str(root))
    stubbed = False
    try:
        if "einops" not in sys.modules and importlib.util.find_spec("einops") is None:
            sys.modules["einops"] = _einops_stub()
            stubbed = True
        yield
    finally:
        sys.path.remove(str(root))
        _purge(root)
        if stubbed:
            sys.modules.pop("einops", None)


def import_official(root: Path, *modules: str) -> list[types.ModuleType]:
    """Import ``modules`` (dotted names) of the checkout at ``root``."""
    with official_path(root):
        return [importlib.import_module(m) for m in modules]


# --------------------------------------------------------------------------------------------------------------
# The shims


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, (str, int)) and not isinstance(device, bool) and (
        isinstance(device, int) or str(device).startswith("cuda")
    )


def map_cuda(patches: Patches, device: torch.device | str = "cpu") -> None:
    """``.cuda()`` on tensors and modules, and ``module.to("cuda")``, go to ``device`` instead (the official
    code calls them unconditionally)."""
    device = torch.device(device)
    if device.type == "cuda":
        return
    module_to = nn.Module.to

    def tensor_cuda(self, *args, **kwargs):
        return self.to(device)

    def module_cuda(self, *args, **kwargs):
        return module_to(self, device)

    def to(self, *args, **kwargs):
        args = tuple(device if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = device
        return module_to(self, *args, **kwargs)

    patches.setattr(torch.Tensor, "cuda", tensor_cuda)
    patches.setattr(nn.Module, "cuda", module_cuda)
    patches.setattr(nn.Module, "to", to)


def sampler_takes_data_source(patches: Patches) -> None:
    """torch >= 2.2 removed ``Sampler.__init__(data_source)``; the official samplers still pass it."""
    from torch.utils.data import Sampler

    if "__init__" in Sampler.__dict__:
        return
    patches.setattr(Sampler, "__init__", lambda self, data_source=None: None)


def torch2(patches: Patches, device: torch.device | str = "cpu") -> None:
    """The shims every official module needs here: CUDA calls to ``device`` and torch-2 API changes."""
    map_cuda(patches, device)
    sampler_takes_data_source(patches)


def sorted_listdir(patches: Patches) -> None:
    """``os.listdir`` returns sorted names (the official file lists otherwise depend on the file system)."""
    listdir = os.listdir
    patches.setattr(os, "listdir", lambda path=".": sorted(listdir(path)))


def kmeans_n_init_10(patches: Patches, *modules: Any) -> None:
    """scikit-learn 1.4 changed KMeans' default ``n_init`` from 10 to 1 ("auto"); the official AHL code (2024)
    relies on the old default. Patch ``sklearn.cluster.KMeans`` (for modules imported later) and the ``KMeans``
    name of already imported ``modules``."""
    import sklearn.cluster

    kmeans = functools.partial(sklearn.cluster.KMeans, n_init=10)
    for module in (sklearn.cluster, *modules):
        patches.setattr(module, "KMeans", kmeans)


def no_detect_anomaly(patches: Patches) -> None:
    """The official AHL main module switches autograd's anomaly detection on globally when imported (a 2-10x
    slow-down); switch it off and restore the previous state afterwards."""
    was = torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)
    patches.call_on_restore(lambda: torch.autograd.set_detect_anomaly(was))


class FeatureBody(nn.Module):
    """An ImageNet backbone without input normalisation (the official loaders normalise): image -> last map."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out[-1] if isinstance(out, (list, tuple)) else out


def replace_backbone(patches: Patches, net_module: types.ModuleType, name: str, make: Callable[[], tuple[nn.Module, int]]):
    """The official model module builds its feature extractor through ``build_feature_extractor(name, ...)``
    and reads its channel count from ``NET_OUT_DIM[name]``: both are replaced in that module, so that the
    official model is built on the same backbone as ours. ``make()`` -> (body, out_channels)."""
    body, channels = make()  # built once to learn the channel count; each model gets a fresh one

    def build_feature_extractor(backbone, *args, **kwargs):
        if backbone != name:
            raise ValueError(f"parity shim: backbone {backbone!r} asked for, {name!r} installed")
        return FeatureBody(make()[0])

    patches.setattr(net_module, "build_feature_extractor", build_feature_extractor)
    patches.setitem(net_module.NET_OUT_DIM, name, channels)
    del body


class ScoreRecorder:
    """Wraps ``sklearn.metrics.roc_auc_score`` to keep the (labels, scores) of every call: the official train
    scripts compute their test AUC from the per-image scores and print only the AUC."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def install(self, patches: Patches) -> None:
        import sklearn.metrics

        original = sklearn.metrics.roc_auc_score

        def recording(y_true, y_score, *args, **kwargs):
            self.calls.append((list(map(float, y_true)), list(map(float, y_score))))
            return original(y_true, y_score, *args, **kwargs)

        patches.setattr(sklearn.metrics, "roc_auc_score", recording)


@contextlib.contextmanager
def standard_reference(*loss_modules: types.ModuleType) -> Iterator[None]:
    """The official deviation loss draws 5,000 r ~ N(0, 1) per call and divides by their sample std. Inside this
    context its ``torch.normal`` returns a fixed vector with mean exactly 0 and std exactly 1, so the loss can be
    compared with ours (which uses the distribution's mean 0 and std 1) without the draw's noise."""

    class TorchProxy:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def normal(mean, std, *args, **kwargs):
            n = std.numel() if isinstance(std, torch.Tensor) else 5000
            r = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
            r = (r - r.mean()) / r.std()
            return r.to(torch.float32)

    with Patches() as p:
        for module in loss_modules:
            p.setattr(module, "torch", TorchProxy())
        yield


__all__ = [
    "FeatureBody",
    "Patches",
    "ScoreRecorder",
    "import_official",
    "kmeans_n_init_10",
    "map_cuda",
    "no_detect_anomaly",
    "official_path",
    "replace_backbone",
    "sampler_takes_data_source",
    "sorted_listdir",
    "standard_reference",
    "torch2",
]
