"""What every stage script shares: reading params.yaml (the one config path), the import path, one-line errors.

Stage scripts are thin: read their params, call the library, write their outs. Each also runs as a plain
``python stages/NAME.py`` command without DVC (e.g. on a GPU machine that has no dvc installed).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python stages/x.py` puts stages/ on the path, not the project root
    sys.path.insert(0, str(ROOT))

from ahl.core.config import check_keys, from_params, load_yaml, path_component  # noqa: E402
from ahl.core.console import setup_logging  # noqa: E402
from ahl.core.errors import UserError  # noqa: E402
from ahl.core.io import write_json  # noqa: E402
from ahl.core.layout import UNCOSTED, cost  # noqa: E402

log = logging.getLogger("stage")
T = TypeVar("T")

# The top level of params.yaml: three values and one section per part of the pipeline. The stage `selection`
# (the first one) checks every section against its dataclass, so a typo anywhere stops `dvc repro` at once.
VALUES = ("classname", "seed", "device")
# The seeds the stages derive from ``seed`` (e.g. psi's dropout: seed * 1000 + epoch) must stay within torch's
# 64-bit generator seed, numpy takes any whole number >= 0; 32 bits leave a wide margin and are what most tools
# print and accept.
MAX_SEED = 2**32 - 1
SECTIONS = (
    "data", "embedded", "protocol", "backbone", "base", "features", "ahl", "evaluate", "threshold", "distributed",
    "runtime",
)  # fmt: skip


class Params:
    """params.yaml, checked at the top level; sections become typed dataclasses on request."""

    def __init__(self, raw: dict[str, Any], path: str | Path = "params.yaml"):
        check_keys(raw, VALUES + SECTIONS, "")
        missing = [k for k in VALUES + SECTIONS if k not in raw]
        if missing:
            raise UserError(f"params.yaml: missing key(s) {', '.join(missing)} ({path})")
        self.raw, self.path = raw, Path(path)
        self._device, self._lease = None, None  # this stage's device, and the GPUs it holds (compute.py)
        if not isinstance(raw["classname"], str) or not raw["classname"]:
            raise UserError(f"params.yaml: classname = {raw['classname']!r} must be a subset name, e.g. brick")
        path_component(raw["classname"], "params.yaml: classname")  # one folder name: never a path elsewhere
        seed = raw["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"params.yaml: seed = {seed!r} must be a whole number from 0 to {MAX_SEED} (2**32 - 1)")
        if not isinstance(raw["device"], str):
            raise UserError(f"params.yaml: device = {raw['device']!r} must be auto, cpu, cuda or cuda:N")

    @property
    def classname(self) -> str:
        return self.raw["classname"]

    @property
    def seed(self) -> int:
        return self.raw["seed"]

    @property
    def device(self) -> str:
        return self.raw["device"]

    def section(self, name: str, cls: type[T]) -> T:
        return from_params(cls, self.raw[name], name)


def local_path(local: str | None) -> Path | None:
    """data.local as a path; relative to the project root (where params.yaml is), like every other path."""
    if local is None:
        return None
    path = Path(local).expanduser()
    return path if path.is_absolute() else ROOT / path


def run(main: Callable[[Params], None], description: str) -> None:
    """Parse ``--params``, set up logging, call ``main(params)``; a UserError becomes one line and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    setup_logging(args.verbose)
    start = time.perf_counter()
    try:
        main(Params(load_yaml(args.params), args.params))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    stage = Path(sys.argv[0]).stem
    if stage not in UNCOSTED and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0's process
        write_json(ROOT / cost(stage), spent(start))


def spent(start: float) -> dict[str, float]:
    """The CPU seconds (user + system) of this process and of the children it waited for, and the wall seconds
    since ``start``; what a stage records in its cost file (ahl/core/layout.py, COST_DIR)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"cpu_s": round(cpu, 1), "wall_s": round(time.perf_counter() - start, 1)}
