"""Fuzz params.yaml: any value of any type at any key gives either a valid config or a one-line UserError that
names the key; never a traceback. (The first stage, selection, runs exactly this check.)"""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ahl.core.config import load_yaml
from ahl.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))
from common import Params  # noqa: E402

CHECK = runpy.run_path(str(ROOT / "stages" / "selection.py"))["check"]
COMMITTED = load_yaml(ROOT / "params.yaml")


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


PATHS = _paths(COMMITTED)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda:7", "dra", "devnet", "psi", "draem", "2e-4", "-1"]),
)  # fmt: skip
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


@settings(max_examples=250, deadline=None, derandomize=True)
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS + [("sede",), ("base", "lrr")]), VALUES), min_size=1, max_size=3))
def test_any_value_at_any_key_is_accepted_or_a_one_line_error_naming_a_key(changes):
    raw = copy.deepcopy(COMMITTED)
    names = []
    for path, value in changes:
        node = raw
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
        names.append(".".join(path))
    try:
        CHECK(Params(raw))
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message, message
        # the error names one of the changed keys (or, for a section replaced wholesale, one of its keys)
        assert any(n in message for n in names), (names, message)
