"""The house plan, checked: dvc.yaml's deps match what each stage imports, no import circles, size limits."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Project modules (``ahl...`` and the stage helpers) ``path`` imports anywhere, functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def module_file(name: str, stage_dir: Path, root: Path = ROOT) -> Path | None:
    """The file of a project module name (``ahl.x.y`` or a stage helper such as ``common``), else None."""
    if name.split(".")[0] == "ahl":
        for candidate in (root / (name.replace(".", "/") + ".py"), root / name.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    candidate = stage_dir / f"{name}.py"
    return candidate if "." not in name and candidate.is_file() else None


def import_closure(script: Path, root: Path = ROOT) -> set[Path]:
    """Every project file ``script`` needs, transitively (itself included)."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            target = module_file(name, script.parent, root)
            if target is not None:
                todo.append(target)
    return seen


def stage_scripts(dvc_yaml: dict, root: Path = ROOT) -> dict[str, Path]:
    scripts = {}
    for name, stage in dvc_yaml["stages"].items():
        words = [w for w in stage["cmd"].split() if w.endswith(".py")]
        assert len(words) == 1, f"stage {name}: expected one script in its cmd {stage['cmd']!r}"
        scripts[name] = root / words[0]
    return scripts


def deps_problems(root: Path) -> list[str]:
    """What is wrong with dvc.yaml's deps under ``root``: files a stage imports but does not list, listed files
    that do not exist. Package ``__init__`` files count as imports (they run on import)."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    problems = []
    for name, script in stage_scripts(dvc_yaml, root).items():
        deps = {d for d in dvc_yaml["stages"][name].get("deps", [])}
        for dep in sorted(deps):
            if not (root / dep).exists() and not dep.startswith(("data/", "models/", "cache/")):
                problems.append(f"stage {name}: dep {dep} does not exist")
        needed = {p.relative_to(root).as_posix() for p in import_closure(script, root)}
        for missing in sorted(needed - deps):
            if not any(missing.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(f"stage {name}: imports {missing} but does not list it in deps")
    return problems


def test_stage_deps_match_imports():
    assert deps_problems(ROOT) == []


def test_deps_check_catches_a_missing_and_a_stale_dep(tmp_path):
    for item in ("dvc.yaml", "stages", "ahl"):
        (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, tmp_path / item)
    dvc_yaml = yaml.safe_load((tmp_path / "dvc.yaml").read_text())
    dvc_yaml["stages"]["train_ahl"]["deps"].remove("ahl/method")  # a folder dep: each of its files counts
    deps = dvc_yaml["stages"]["evaluate"]["deps"]
    deps[deps.index("ahl/evaluation/image_metrics.py")] = "ahl/no_such_module.py"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    problems = deps_problems(tmp_path)
    assert "stage train_ahl: imports ahl/method/train_ahl.py but does not list it in deps" in problems
    assert "stage evaluate: dep ahl/no_such_module.py does not exist" in problems
    assert "stage evaluate: imports ahl/evaluation/image_metrics.py but does not list it in deps" in problems


PARAM_PROPERTIES = ("classname", "seed", "device")  # stages/common.py Params' properties of params.yaml values


def params_read(script: Path) -> set[str]:
    """The top-level params (sections and values) stage ``script``'s main reads through stages/common.py's Params,
    following its calls into the stage helpers (compute.py, scoring.py ...): ``params.section("name", ...)``,
    ``params.seed``/``.device``/``.classname`` and ``params.raw["name"]``."""
    trees = {p.stem: ast.parse(p.read_text()) for p in script.parent.glob("*.py")}
    functions = {m: {n.name: n for n in ast.walk(t) if isinstance(n, ast.FunctionDef)} for m, t in trees.items()}
    imported = {
        m: {a.asname or a.name: n.module for n in ast.walk(t) if isinstance(n, ast.ImportFrom) and n.module in trees
            for a in n.names}
        for m, t in trees.items()
    }  # fmt: skip
    reads, seen, todo = set(), set(), [(script.stem, "main")]
    while todo:
        module, name = todo.pop()
        if (module, name) in seen or name not in functions.get(module, {}):
            continue
        seen.add((module, name))
        for node in ast.walk(functions[module][name]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "section":
                if node.args and isinstance(node.args[0], ast.Constant):
                    reads.add(node.args[0].value)
            elif isinstance(node, ast.Attribute) and node.attr in PARAM_PROPERTIES:
                if isinstance(node.value, ast.Name) and node.value.id == "params":
                    reads.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "raw":
                if isinstance(node.slice, ast.Constant):
                    reads.add(node.slice.value)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                callee = node.func.id
                todo.append((imported[module].get(callee, module), callee))
    return reads


def test_stage_params_match_what_each_stage_reads():
    """Every params section or value a stage reads is declared in its dvc.yaml params (a section or keys of it):
    an undeclared one (calibrate's runtime once) lets a change of it leave the stage's outputs stale."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    problems = []
    for name, script in stage_scripts(dvc_yaml).items():
        declared = {str(p).split(".")[0] for p in dvc_yaml["stages"][name].get("params", [])}
        problems += [f"stage {name} reads params {r!r} but dvc.yaml does not declare it"
                     for r in sorted(params_read(script) - declared)]  # fmt: skip
    assert problems == []
    # the reader follows calls into the helpers: calibrate reaches runtime and device through scoring and compute
    assert {"threshold", "runtime", "device", "distributed"} <= params_read(ROOT / "stages/calibrate.py")


def test_stage_paths_are_declared_in_dvc_yaml():
    """The paths each stage script uses (ahl/core/layout.py's, imported from it or through a helper such as
    stages/scoring.py, and any path constant of its own) are its deps or outs in dvc.yaml; every layout path is
    some stage's out."""
    from ahl.core import layout

    paths = {k: v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and k != "COST_DIR"}
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    every_out = set()
    for name, script in stage_scripts(dvc_yaml).items():
        stage = dvc_yaml["stages"][name]
        declared = set(stage.get("deps", []))
        for kind in ("outs", "metrics", "plots"):
            outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage.get(kind, [])}
            declared |= outs
            every_out |= outs
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("ahl.core.layout", "scoring"):
                for alias in node.names:
                    if alias.name in paths:
                        assert paths[alias.name] in declared, (
                            f"stage {name}: {alias.name} = {paths[alias.name]} is not a dep or out in dvc.yaml")
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, ast.Assign) and all(isinstance(t, (ast.Name, ast.Tuple)) for t in node.targets):
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for v in values:
                    if isinstance(v, ast.Constant) and isinstance(v.value, str) and "/" in v.value and " " not in v.value:
                        assert v.value in declared, f"stage {name}: {v.value} is not a dep or out in dvc.yaml"
    assert set(paths.values()) - every_out == set(), "a path of ahl/core/layout.py that no stage makes"
    for name, stage in dvc_yaml["stages"].items():  # the cost file stages/common.py writes: a metric DVC caches
        metrics = [m if isinstance(m, str) else {next(iter(m)): m[next(iter(m))]} for m in stage.get("metrics", [])]
        if name in layout.UNCOSTED:
            assert not any(str(m).startswith(layout.COST_DIR) for m in metrics), name
        else:
            assert layout.cost(name) in metrics, f"stage {name}: metrics lacks {layout.cost(name)}"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in (ROOT / "ahl").rglob("*.py"):
        name = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        graph[name] = {m for m in imported_modules(path) if module_file(m, ROOT / "stages") is not None}
        graph[name] = {m if (ROOT / (m.replace(".", "/") + ".py")).is_file() or (ROOT / m.replace(".", "/")).is_dir()
                       else m.rsplit(".", 1)[0] for m in graph[name]} - {name}  # fmt: skip
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(_graph()) is None, f"import cycle: {' -> '.join(find_cycle(_graph()))}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def drawn_layers(text: str) -> dict[str, int]:
    """docs/architecture.md's layer list: {module (ahl.x.y): its floor}, the top line the highest floor."""
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    lines = [line.split() for line in block.strip("\n").splitlines() if line.strip()]
    floors = {}
    for floor, words in zip(range(len(lines), 0, -1), lines):
        for word in words:
            if not word.endswith(".py"):
                break
            floors["ahl." + word.removesuffix(".py").replace("/", ".")] = floor
    return floors


def layer_problems(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Modules of ``graph`` missing from the drawing, and imports of a module drawn above the importer."""
    modules = {m for m in graph if not (ROOT / m.replace(".", "/") / "__init__.py").is_file()}  # not packages
    problems = [f"{m} is not drawn in docs/architecture.md" for m in sorted(modules - set(floors))]
    problems += [f"{m} is drawn but does not exist" for m in sorted(set(floors) - modules)]
    for module in sorted(modules & set(floors)):
        for target in sorted(graph[module] & set(floors)):
            if floors[target] > floors[module]:
                problems.append(f"{module} imports {target}, which is drawn above it")
    return problems


def test_architecture_layers_match_imports():
    floors = drawn_layers((ROOT / "docs/architecture.md").read_text())
    assert layer_problems(_graph(), floors) == []


def test_layer_check_catches_an_upward_import_and_an_undrawn_module():
    text = (ROOT / "docs/architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    lines = block.strip("\n").splitlines()
    scorer = next(i for i, line in enumerate(lines) if line.startswith("evaluation/scorer.py"))
    lines.insert(len(lines) - 1, lines.pop(scorer))  # the scorer drawn just above the ground floor
    lines = [line for line in lines if not line.startswith("pseudo/maker.py")]
    broken = text.replace(block, "\n" + "\n".join(lines) + "\n")
    problems = layer_problems(_graph(), drawn_layers(broken))
    assert "ahl.evaluation.scorer imports ahl.models.base, which is drawn above it" in problems
    assert "ahl.deploy.predict imports ahl.evaluation.scorer" not in " ".join(problems)  # it is above: allowed
    assert "ahl.pseudo.maker is not drawn in docs/architecture.md" in problems


def test_library_never_imports_dvc():
    for path in (ROOT / "ahl").rglob("*.py"):
        roots = {m.split(".")[0] for m in imported_modules(path)}
        assert not roots & {"dvc", "dvclive"}, f"{path} imports dvc/dvclive"


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_module_and_function_sizes():
    """No module outside ahl/data over 350 lines; no function over 60 lines outside tests and benchmarks."""
    files = [*(ROOT / "ahl").rglob("*.py"), *(ROOT / "stages").glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    for path in sorted(files):
        if "data" not in path.relative_to(ROOT).parts:
            n = len(path.read_text().splitlines())
            assert n <= 350, f"{path.relative_to(ROOT)} has {n} lines (limit 350)"
        for name, n in _functions(path):
            assert n <= 60, f"{path.relative_to(ROOT)}: {name} has {n} lines (limit 60)"


def test_stage_scripts_run_without_dvc(tmp_path):
    """Each stage script imports (and shows --help) with dvc and dvclive unimportable, as on a GPU machine."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\nclass _Block:\n    def find_spec(self, name, *a, **k):\n"
        "        if name.split('.')[0] in ('dvc', 'dvclive'):\n            raise ImportError(name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for script in sorted((ROOT / "stages").glob("*.py")):
        if script.stem in ("common", "live"):
            continue
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, f"{script.name}: {out.stderr[-500:]}"


def test_stages_import_only_what_they_use():
    """Stage start-up is mostly imports (torch about 3 s, torchvision about 3 s more through torch._dynamo,
    scikit-learn about 2 s): the data stages import none of them, selection (every section's config) and train_ahl
    (cached features only) torch alone. Each script is run up to its --help (its imports, not its main)."""
    code = (
        "import os, runpy, sys\nsys.argv = [sys.argv[1], '--help']\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n    pass\nprint('imported:', *(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    allowed = {"local_manifest": set(), "download": set(), "convert": set(), "split": set(), "selection": {"torch"},
               "train_ahl": {"torch"}}  # fmt: skip
    for stage, ok in allowed.items():
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "stages" / f"{stage}.py")], capture_output=True,
                             text=True, cwd=ROOT, check=True)  # fmt: skip
        imported = set(next(line for line in out.stdout.splitlines() if line.startswith("imported:")).split()[1:])
        assert imported <= ok, f"stages/{stage}.py imports {sorted(imported - ok)} at start-up"


if __name__ == "__main__":
    for p in deps_problems(ROOT):
        print(p)


def test_packaging_declares_ranges_and_the_deploy_extras():
    """pyproject.toml: the library's dependencies as ranges (never pins), extras onnx, openvino and deploy (both),
    the lab's stack as an extra; requirements.txt pins every package exactly for the lab and CI."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *(d for group in extras.values() for d in group)]
    assert declared and not [d for d in declared if "==" in d], "pyproject.toml pins a version: use a range"
    assert {"onnx", "openvino", "serve", "deploy", "lab"} <= set(extras)
    assert extras["onnx"] == ["onnxruntime>=1.20"] and extras["openvino"] == ["openvino>=2025.0"]
    assert extras["deploy"] == ["ahl[onnx,openvino,serve]"]
    assert not [d for d in project["dependencies"] if re.match(r"(torch|timm|dvc)\b", d)]  # the line: no torch
    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = [p for p in pins if p and not p.startswith("-e")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][^ ]*", p) for p in pins), pins
