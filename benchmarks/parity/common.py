"""What every parity script shares before it runs anything: the repository root, a headless environment for the
official code, and where the official checkouts live (with an error that says how to get a missing one).

``python benchmarks/parity/X.py`` starts with this folder on sys.path, not the repository root: each script puts
the root there in one line and imports the rest from here. Nothing here imports torch, so ``headless()`` can run
first (torch imports tqdm, which reads ``TQDM_DISABLE`` once).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/parity
ROOT = HERE.parents[1]  # the repository


def headless() -> None:
    """matplotlib without a display, tqdm without bars: for the scripts that import the official code (call it
    before importing torch)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")


# --------------------------------------------------------------------------------------------------------------
# Where the official code lives


@dataclass(frozen=True)
class Official:
    """One official repository: its name, where to clone it, how to recognise a checkout, its flag."""

    name: str
    url: str
    marker: str  # a file every checkout has; its absence means "not a checkout of this repository"
    flag: str  # the command-line flag that takes its path


OFFICIAL = {
    "dra": Official("DRA (Ding et al., CVPR 2022)", "https://github.com/Choubo/DRA", "modeling/net.py", "--official-dra"),
    "devnet": Official(
        "DevNet for images (Pang et al.)", "https://github.com/Choubo/deviation-network-image", "modeling/net.py",
        "--official-devnet",
    ),
    "ahl": Official("AHL (Zhu et al., CVPR 2024)", "https://github.com/mala-lab/AHL", "modeling/DRA_AHL.py", "--official-ahl"),
}
# commits the figures in docs/parity.md were measured with
MEASURED_COMMITS = {
    "dra": "3fb0e9cce9bee3c23072caa30c889b905c4830ed",
    "devnet": "7a13ee63734148c637746999a4939011c828ea9b",
    "ahl": "7114e08243a8c6ea591a5e74c8dc176c913bddb8",
}


class MissingCheckout(Exception):
    """The path given for an official repository is missing or is not a checkout of it."""


def how_to_get(kind: str, path: str | Path | None = None) -> str:
    """The git commands that fetch the measured commit of an official repository (into ``path``)."""
    o = OFFICIAL[kind]
    target = path or Path("official") / kind
    return f"git clone {o.url} {target} (measured at commit {MEASURED_COMMITS[kind][:10]}: git -C {target} checkout {MEASURED_COMMITS[kind][:10]})"


def check_checkout(kind: str, path: str | Path | None) -> Path:
    """The checkout's root, or MissingCheckout naming the flag, the repository and how to get it."""
    o = OFFICIAL[kind]
    if path is None:
        raise MissingCheckout(f"{o.flag} is required: the path of a checkout of the official {o.name} code; "
                              f"get it with: {how_to_get(kind)}")  # fmt: skip
    root = Path(path).expanduser().resolve()
    if not (root / o.marker).is_file():
        what = "does not exist" if not root.exists() else f"is not a checkout of {o.url} (no {o.marker})"
        raise MissingCheckout(f"{o.flag} {path}: {what}; get the official {o.name} code with: {how_to_get(kind, path)}")
    return root


def find_checkouts(paths: dict[str, str | Path | None]) -> dict[str, Path] | None:
    """Each kind's checkout root (``check_checkout``, in the order given), or None after printing the first
    MissingCheckout as ``error: ...`` on stderr: the scripts then exit with status 2."""
    try:
        return {kind: check_checkout(kind, path) for kind, path in paths.items()}
    except MissingCheckout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
