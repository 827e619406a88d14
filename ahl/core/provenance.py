"""Provenance: every model and cache records the sha256 of the inputs it was made from; a stage that reads it
refuses one made from other inputs than those on disk now (a stage run by hand out of order, an old file)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ahl.core.errors import UserError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def inputs(**paths: str | Path) -> dict[str, str]:
    """{name: sha256 of the file} for the record of what an output was made from."""
    return {name: sha256_file(path) for name, path in paths.items()}


def check(output: str | Path, recorded: dict | None, rerun: str, **paths: str | Path) -> None:
    """Refuse ``output`` when it records other inputs than the files ``paths`` now are."""
    recorded = recorded or {}
    for name, path in paths.items():
        now = sha256_file(path)
        then = recorded.get(name)
        if then != now:
            made = f"with no record of {path}"
            if then:
                made = f"from another {path} (sha256 {then[:12]}..., now {now[:12]}...)"
            raise UserError(
                f"{output} was made {made}: the stages ran out of order or by hand; bring them in line with "
                f"`dvc repro` (or rerun `{rerun}` and the stages after it)"
            )
