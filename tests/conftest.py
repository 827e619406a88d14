"""Shared fixtures: a small embedded dataset in MVTec layout, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ahl.data.embedded import EmbeddedConfig, build_embedded


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded") / "mvtec"
    build_embedded(root, EmbeddedConfig(image_size=64, n_train=12, n_test_good=6, n_per_defect=5, seed=0))
    return root
