"""What every stage script shares: params.yaml loading, the import path, and one-line errors.

Stage scripts are thin: read their params, call the library, write their outs. Each also runs as a plain
``python stages/NAME.py`` command without DVC (e.g. on a GPU machine that has no dvc installed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python stages/x.py` puts stages/ on the path, not the project root
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from ahl.errors import UserError  # noqa: E402
from ahl.runtime import setup_logging  # noqa: E402

log = logging.getLogger("stage")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing {path}: run stages from the project root, or pass --params PATH")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of sections")
    return params


def section(params: dict, name: str) -> dict:
    value = params.get(name) or {}
    if not isinstance(value, dict):
        raise UserError(f"params.yaml: {name} must be a mapping, got {value!r}")
    return value


def run(main: Callable[[dict[str, Any]], None], description: str) -> None:
    """Parse ``--params``, set up logging, call ``main(params)``; a UserError becomes one line and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    setup_logging(args.verbose)
    try:
        main(load_params(args.params))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
