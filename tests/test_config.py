"""One config path: every section of params.yaml through one strict loader; every mistake a one-line error."""

from __future__ import annotations

import copy
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ahl.core.config import from_params, load_yaml
from ahl.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "stages"))
from common import SECTIONS, Params  # noqa: E402

CONFIGS = runpy.run_path(str(ROOT / "stages" / "selection.py"))["CONFIGS"]
COMMITTED = load_yaml(ROOT / "params.yaml")


def test_every_section_of_the_committed_params_loads():
    params = Params(copy.deepcopy(COMMITTED))
    assert set(CONFIGS) == set(SECTIONS)
    for name, cls in CONFIGS.items():
        params.section(name, cls)


def _first_scalar_key(section: dict) -> str:
    return next(k for k, v in section.items() if not isinstance(v, dict))


@pytest.mark.parametrize("name", SECTIONS)
def test_a_typo_in_any_section_is_an_error_naming_it_and_the_nearest_key(name):
    raw = copy.deepcopy(COMMITTED)
    key = _first_scalar_key(raw[name])
    typo = key[:-1] + ("x" if key[-1] != "x" else "y")
    raw[name][typo] = raw[name].pop(key)
    with pytest.raises(UserError, match=rf"unknown key {name}\.{typo} \(did you mean '{key}'\?\)"):
        Params(raw).section(name, CONFIGS[name])


@pytest.mark.parametrize("name", SECTIONS)
def test_a_missing_key_in_any_section_is_an_error(name):
    raw = copy.deepcopy(COMMITTED)
    key = _first_scalar_key(raw[name])
    del raw[name][key]
    with pytest.raises(UserError, match=rf"missing key\(s\) {name}\.{key}"):
        Params(raw).section(name, CONFIGS[name])


def test_top_level_mistakes():
    raw = copy.deepcopy(COMMITTED)
    raw["sede"] = raw.pop("seed")
    with pytest.raises(UserError, match=r"unknown key sede \(did you mean 'seed'\?\)"):
        Params(raw)
    for key, value in (("seed", "abc"), ("seed", -1), ("seed", True), ("classname", 3), ("device", 0)):
        raw = copy.deepcopy(COMMITTED)
        raw[key] = value
        with pytest.raises(UserError, match=rf"params.yaml: {key} = "):
            Params(raw)
    raw = copy.deepcopy(COMMITTED)
    del raw["evaluate"]
    with pytest.raises(UserError, match="missing key.*evaluate"):
        Params(raw)


def test_yaml_reads_exponent_floats_as_dvc_does(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: 2e-4\nb: 1.5E+3\nc: 1e5\nd: '2e-4'\ne: 1_000\n")
    assert load_yaml(path) == {"a": 2e-4, "b": 1500.0, "c": 1e5, "d": "2e-4", "e": 1000}
    assert yaml.safe_load(path.read_text())["a"] == "2e-4"  # what plain YAML 1.1 would have given


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("features", "families", "draem", r"features.families = 'draem' is not a list of str"),
        ("features", "batch_size", 0, r"features.batch_size must be >= 1"),
        ("evaluate", "batch_size", 0, r"evaluate.batch_size must be >= 1"),
        ("base", "lr", "fast", r"base.lr = 'fast' is not float"),
        ("base", "epochs", 2.5, r"base.epochs = 2.5 is not int"),
        ("ahl", "second_order", "yes", r"ahl.second_order = 'yes' is not bool"),
        ("protocol", "known_class", 3, r"protocol.known_class = 3 is not str or null"),
        ("backbone", "image_size", -1, r"backbone.image_size must be > 0"),
        ("base", "topk", 2.0, r"base.topk = 2.0 is a fraction of positions"),
        ("base", "lr_step", 0, r"base.lr_step must be > 0"),
        ("base", "pseudo_prob", 1.5, r"base.pseudo_prob = 1.5 is a probability"),
        ("ahl", "lr_step", 0, r"ahl.lr_step must be >= 1"),
        ("ahl", "outer_steps_per_epoch", 3, r"must divide ahl.steps_per_epoch"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    raw = copy.deepcopy(COMMITTED)
    raw[section][key] = value
    with pytest.raises(UserError, match=message):
        Params(raw).section(section, CONFIGS[section])


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(UserError, match="params.yaml: ahl.hadg must be a mapping"):
        from_params(CONFIGS["ahl"], {**COMMITTED["ahl"], "hadg": 3}, "ahl")


def test_a_stage_prints_one_line_and_exits_2(tmp_path):
    raw = copy.deepcopy(COMMITTED)
    raw["evaluate"]["batch_sise"] = raw["evaluate"].pop("batch_size")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    res = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "selection.py"), "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key evaluate.batch_sise (did you mean 'batch_size'?); known keys: batch_size"
    ]


def _stage(stage: str, params: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python stages/STAGE.py`` from a copy of the code in ``cwd``: a stage that took the params would find no
    data there, so it can never train on (or overwrite) the outputs of the clone running the tests."""
    for part in ("ahl", "stages"):
        if not (cwd / part).exists():
            shutil.copytree(ROOT / part, cwd / part, ignore=shutil.ignore_patterns("__pycache__"))
    return subprocess.run([sys.executable, str(cwd / "stages" / f"{stage}.py"), "--params", str(params)],
                          capture_output=True, text=True, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("where", ["top", "section"])
def test_a_duplicated_key_is_refused_by_a_plain_python_stage_as_by_dvc(tmp_path, where):
    """Was: PyYAML kept the last value, and train_base trained with it, where `dvc repro` refuses the file."""
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    if where == "top":
        first = next(k for k, line in enumerate(lines) if line.startswith("seed:"))
        lines.append("seed: 7")
        key = "seed"
    else:
        first = next(k for k, line in enumerate(lines) if line.startswith("  epochs:"))
        lines.insert(first + 1, "  epochs: 99")
        key = "epochs"
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    res = _stage("train_base", tmp_path / "params.yaml", tmp_path)
    second = len(lines) if where == "top" else first + 2
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: key '{key}' given twice (lines {first + 1} and {second}); keep one "
        "(DVC refuses the file too)"
    ]
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("seed", [12345678901234567890, 2**32, -1])
def test_a_seed_out_of_every_generators_range_stops_the_first_stage(tmp_path, seed):
    """Was: a 20-digit seed passed selection and split and ended train_base in a traceback."""
    raw = copy.deepcopy(COMMITTED)
    raw["seed"] = seed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in ("selection", "train_base"):
        res = _stage(stage, tmp_path / "params.yaml", tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines() == [
            f"error: params.yaml: seed = {seed} must be a whole number from 0 to 4294967295 (2**32 - 1)"
        ]
    raw["seed"] = 2**32 - 1
    Params(raw)  # the largest accepted


BOUNDS = [  # (section, key, the largest accepted value), as ahl/core/config.py's MAX_* give them
    ("base", "epochs", 10_000), ("base", "steps_per_epoch", 100_000), ("base", "batch_size", 4_096),
    ("ahl", "epochs", 10_000), ("ahl", "steps_per_epoch", 100_000), ("ahl", "update_step", 100_000),
    ("ahl", "batch_size", 4_096), ("ahl", "eval_batch_size", 4_096), ("features", "batch_size", 4_096),
    ("evaluate", "batch_size", 4_096), ("threshold", "batch_size", 4_096),
]  # fmt: skip


@pytest.mark.parametrize(("section", "key", "high"), BOUNDS)
def test_runaway_run_lengths_and_batches_are_one_line(section, key, high):
    """base.epochs=1000000000000 used to train "epoch 113/1000000000000"; a batch of 10^8 swapped silently."""
    raw = load_yaml(ROOT / "params.yaml")
    cls = CONFIGS[section]
    if section == "ahl":  # outer steps must divide the steps: keep them equal to 1
        raw["ahl"]["outer_steps_per_epoch"] = 1
    from_params(cls, {**raw[section], key: high}, section)  # the bound itself is accepted
    with pytest.raises(UserError) as err:
        from_params(cls, {**raw[section], key: high * 10**8}, section)
    assert str(err.value).startswith(f"params.yaml: {section}.{key} = {high * 10**8} is above the limit of {high}")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """`<<: *base` merges a mapping whose keys the merging one may override, as DVC reads it; a real duplicate
    next to a merge is still refused."""
    path = tmp_path / "p.yaml"
    path.write_text("base: &b {lr: 1, epochs: 2}\nahl:\n  <<: *b\n  epochs: 3\nboth:\n  <<: [*b, {x: 1}]\n")
    assert load_yaml(path) == {"base": {"lr": 1, "epochs": 2}, "ahl": {"lr": 1, "epochs": 3},
                               "both": {"lr": 1, "epochs": 2, "x": 1}}  # fmt: skip
    path.write_text("base: &b {lr: 1}\nahl:\n  <<: *b\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(UserError, match=r"key 'epochs' given twice \(lines 4 and 5\)"):
        load_yaml(path)
