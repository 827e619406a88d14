"""``DataConfig``: params.yaml's ``data`` section, every value checked with a one-line error naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ahl.core.errors import UserError
from ahl.data.download import DataConfig, obtain
from ahl.data.registry import Source

GOOD = {"split_seed": 42, "downloads": "data/downloads", "mirror": None, "local": None, "max_pixels": 40_000_000}


def test_good_values() -> None:
    assert DataConfig(**GOOD).split_seed == 42
    for mirror in ("https://example.org/files/", "http://127.0.0.1:8000/x.zip", "file:///srv/mirror/"):
        assert DataConfig(**{**GOOD, "mirror": mirror}).mirror == mirror
    assert DataConfig(**{**GOOD, "local": "~/datasets/mvtec_anomaly_detection.tar.xz"}).local


def test_no_defaults_params_yaml_is_the_one_source_of_values() -> None:
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(DataConfig))
    assert [f.name for f in dataclasses.fields(DataConfig)] == list(GOOD)
    with pytest.raises(TypeError):
        DataConfig(split_seed=42)


@pytest.mark.parametrize(
    "key, value, fix",
    [
        ("mirror", "not a url", "http://, https:// or file://"),
        ("mirror", "ftp://example.org/x.zip", "http://, https:// or file://"),
        ("mirror", "https://", "http://, https:// or file://"),
        ("mirror", 3, "http://, https:// or file://"),
        ("split_seed", -1, ">= 0"),
        ("split_seed", True, ">= 0"),
        ("split_seed", "42", ">= 0"),
        ("downloads", "", "non-empty"),
        ("downloads", None, "non-empty"),
        ("downloads", "data/raw/downloads", "outside"),
        ("local", "./data/mvtec", "outside"),
        ("local", "", "non-empty"),
        ("max_pixels", 0, ">= 1"),
        ("max_pixels", 1.5, ">= 1"),
        ("max_pixels", True, ">= 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_the_fix(key: str, value: object, fix: str) -> None:
    with pytest.raises(UserError) as err:
        DataConfig(**{**GOOD, key: value})
    message = str(err.value)
    assert f"data.{key}" in message and repr(value) in message and fix in message
    assert "\n" not in message


def test_obtain_refuses_a_mirror_that_is_not_a_url(tmp_path: Path) -> None:
    source = Source(key="toy", url="https://example.org/toy.zip")
    with pytest.raises(UserError, match="data.mirror"):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", mirror="not a url", progress=False)
    assert not (tmp_path / "downloads").exists()
