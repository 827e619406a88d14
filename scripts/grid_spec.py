"""The grid file of scripts/grid.py (its header shows one) -> named cells, each a set of `dvc exp run -S`
params."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from ahl.core.errors import UserError  # noqa: E402

KEYS = {"name", "grid", "set", "remote", "slurm", "workdir"}
SLURM_KEYS = {"partition", "account", "gpus", "cpus_per_task", "mem", "time", "max_parallel", "sbatch", "setup"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# --------------------------------------------------------------------------------------------------------------
# The grid: a YAML description -> named cells


def load_grid(path: Path, overrides: list[str]) -> dict:
    """grid.yaml checked, with ``-S key=a,b`` lists applied; a mistake is one line naming the key."""
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise UserError(f"{path}: cannot read the grid ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(
            f"{path}: cannot read the grid, not YAML ({where}{getattr(exc, 'problem', None) or exc})"
        ) from None
    if not isinstance(grid, dict) or set(grid) - KEYS:
        extra = sorted(set(grid) - KEYS) if isinstance(grid, dict) else "not a mapping"
        raise UserError(f"{path}: unknown key(s) {extra}; a grid has {', '.join(sorted(KEYS))}")
    grid.setdefault("grid", {})
    for item in overrides:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise UserError(f"-S {item!r}: expected key=value[,value...], e.g. -S seed=0,1,2")
        grid["grid"][key] = [yaml.safe_load(v) for v in values.split(",")]
    if not NAME.match(str(grid.get("name", ""))):
        raise UserError(f"{path}: name = {grid.get('name')!r} must be letters, digits, . _ - (an experiment prefix)")
    if not isinstance(grid["grid"], dict) or not grid["grid"]:
        raise UserError(f"{path}: grid must map params to lists of values, e.g. seed: [0, 1, 2]")
    for key, values in grid["grid"].items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key} = {values!r} must be a non-empty list")
        bundles = [v for v in values if isinstance(v, dict)]
        if bundles and (len(bundles) < len(values) or any(not NAME.match(str(b.get("name", ""))) for b in bundles)):
            raise UserError(f"{path}: grid.{key}: a list of named sets of params gives every item a name "
                            "(letters, digits, . _ -), e.g. - {name: long, base.epochs: 30}")  # fmt: skip
    if not isinstance(grid.setdefault("set", {}), dict):
        raise UserError(f"{path}: set must map params to values")
    slurm = grid.setdefault("slurm", {})
    if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
        raise UserError(f"{path}: slurm has unknown key(s) {sorted(set(slurm) - SLURM_KEYS)}; "
                        f"known: {', '.join(sorted(SLURM_KEYS))}")  # fmt: skip
    grid.setdefault("remote", "origin")
    grid.setdefault("workdir", "${TMPDIR:-/tmp}/ahl-grid")
    return grid


def check_keys_exist(grid: dict, params: dict, path: Path) -> None:
    """Every dotted key of the grid is a param of params.yaml: a typo is caught before anything is queued (the
    values are checked by the stages, as in any `dvc exp run`)."""
    for key in [*(k for k, v in grid["grid"].items() if not is_bundle(v)), *grid["set"], *bundle_keys(grid)]:
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"{path}: {key} is not a param of params.yaml (a typo?)")
            node = node[part]


def is_bundle(values: list) -> bool:
    """A grid key whose values are named sets of params (``budget: [{name: long, base.epochs: 30}, ...]``), not
    the values of one param: each cell takes one set whole (a rung of a ladder, a preset)."""
    return bool(values) and isinstance(values[0], dict)


def bundle_keys(grid: dict) -> list[str]:
    return sorted({k for values in grid["grid"].values() if is_bundle(values) for v in values for k in v} - {"name"})


def params_hash(params: dict) -> str:
    """6 hex digits of sha256 over a cell's params (its own and the grid's ``set:``), as sorted JSON."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def cell_name(prefix: str, values: dict, params: dict) -> str:
    """table1-carpet-seed0-n_anomalies10-dra-3fa2c1: a string value as itself, a number after its param's last
    name, a named set of params by its name, and the hash of every param the cell sets (``set:`` included), so
    that a cell is its params: change ``set:`` or a named set and the cells are new ones."""
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):
            parts.append(value["name"])
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(text if isinstance(value, str) else f"{key.rsplit('.', 1)[-1]}{text}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([prefix, *parts]))[:192]
    return f"{name}-{params_hash(params)}"


def expand(grid: dict) -> list[dict]:
    """The cells, in a fixed order: {name, params: {dotted key: value}} (set's params included)."""
    keys = list(grid["grid"])
    cells, seen = [], set()
    for combo in itertools.product(*(grid["grid"][k] for k in keys)):
        values = dict(zip(keys, combo))
        params = dict(grid["set"])
        for key, value in values.items():
            params.update({k: v for k, v in value.items() if k != "name"} if isinstance(value, dict) else {key: value})
        name = cell_name(grid["name"], values, params)
        if name in seen:
            raise UserError(f"grid: two cells are both named {name}; make the values distinct")
        seen.add(name)
        cells.append({"name": name, "params": params})
    return cells


def set_args(params: dict) -> list[str]:
    """`dvc exp run -S` arguments: values written as YAML, so 1e-3, true and null keep their types."""
    out = []
    for key, value in params.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        out += ["-S", f"{key}={text}"]
    return out
