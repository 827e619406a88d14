"""The dataset registry: one entry per dataset, checked when it is made, and imports that go one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ahl.data import converters, registry
from ahl.data.datasets import DATASETS
from ahl.data.registry import Dataset, Source

DATA = Path(__file__).resolve().parents[1] / "ahl" / "data"


def _entry(**changes) -> Dataset:
    fields = {
        "name": "toy",
        "title": "a toy dataset",
        "subsets": ("toy",),
        "licence": "CC0",
        "homepage": "https://example.org/toy",
        "raw_layout": "images/*.png",
        "converter": converters.convert_brainmri,
        "sources": {"toy": Source(key="toy", url="https://example.org/toy.zip")},
    }
    return Dataset(**{**fields, **changes})


# ------------------------------------------------------------------------------------------------ import graph
def _imports_of(path: Path) -> set[str]:
    """The ahl.data modules ``path`` imports, at module level or inside functions alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {
            n.split(".")[2] for n in names if n.startswith("ahl.data.") and (DATA / f"{n.split('.')[2]}.py").exists()
        }
    return found - {path.stem}


def test_imports_between_data_modules_go_one_way() -> None:
    graph = {p.stem: _imports_of(p) for p in DATA.glob("*.py") if p.stem != "__init__"}
    assert graph["registry"] == set(), "registry must not import the modules that register into it"
    # Depth-first search for a cycle.
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_registry_imports_without_the_builtin_entries() -> None:
    code = "import sys, ahl.data.registry; assert 'ahl.data.datasets' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DATA.parents[1])


def test_looking_up_before_registering_says_what_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "DATASETS", {})
    with pytest.raises(RuntimeError, match="import ahl.data.datasets"):
        registry.resolve("elpv")


# ------------------------------------------------------------------------------------------- checked at import
def test_a_misspelt_converter_fails_at_import() -> None:
    """datasets.py names each converter as an attribute of ahl.data.converters: a name that is not there (a typo,
    or a renamed function) stops the import, instead of failing later when a user converts that dataset."""
    code = "import ahl.data.converters as c; del c.convert_hyperkvasir; import ahl.data.datasets"
    run = subprocess.run([sys.executable, "-c", code], check=False, cwd=DATA.parents[1], capture_output=True, text=True)
    assert run.returncode != 0 and "convert_hyperkvasir" in run.stderr, run.stderr


@pytest.mark.parametrize(
    "converter",
    ["convert_elvp", None, lambda raw, out: None, lambda raw: None],
    ids=["a-name", "none", "no-seed", "one-argument"],
)
def test_an_entry_refuses_what_is_not_a_converter(converter) -> None:
    with pytest.raises(TypeError, match="converter"):
        _entry(converter=converter)


def test_every_builtin_converter_is_a_converter_function() -> None:
    for dataset in DATASETS.values():
        assert getattr(converters, dataset.converter.__name__) is dataset.converter, dataset.name


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"sources": {}}, "subsets .* and sources .* differ"),
        ({"sources": {"other": Source(key="toy", url="u")}}, "differ"),
        ({"build": lambda out, config: None}, "built dataset has no sources"),
    ],
)
def test_an_entry_refuses_inconsistent_facts(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _entry(**changes)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"url": "u", "sha256": "abc"}, "not a lower-case hex sha256"),
        ({"url": "u", "sha256": "A" * 64}, "not a lower-case hex sha256"),
        ({"url": "u", "other_archives": {"all.tar": "xyz"}}, "other archive 'all.tar'"),
        ({}, "nothing can obtain it"),
        ({"manual": True, "filename": "toy.zip"}, "needs a filename and instructions"),
    ],
)
def test_a_source_refuses_inconsistent_facts(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Source(key="toy", **fields)


def test_register_refuses_clashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "DATASETS", {})
    registry.register(_entry())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(_entry())
    with pytest.raises(ValueError, match="belong to both"):
        registry.register(_entry(name="toy2", sources={"toy": Source(key="toy2", url="u")}))
    with pytest.raises(ValueError, match="source keys"):
        registry.register(_entry(name="toy3", subsets=("t3",), sources={"t3": Source(key="toy", url="u")}))


def test_every_source_says_how_its_raw_data_is_laid_out() -> None:
    """obtain re-roots on the marker (or extracts members_under): a source with neither gives a layout the converter
    may not find when the archive wraps its data in a folder."""
    for dataset in DATASETS.values():
        for source in dataset.sources.values():
            assert source.marker or source.members_under, source.key
