"""Stage download: obtain the raw data of the selected source into data/raw (built, copied or downloaded)."""

from pathlib import Path

from common import ROOT, Params, run

from ahl.data.download import DataConfig, obtain
from ahl.data.embedded import EmbeddedConfig
from ahl.data.datasets import get_dataset, get_source
from ahl.io import read_json
from ahl.runtime import show_progress

SELECTION, LOCAL, RAW = "data/selection.json", "data/local.json", "data/raw"


def _local(local: str | None) -> Path | None:
    """data.local as a path; relative to the project root (where params.yaml is), like every other path."""
    if local is None:
        return None
    path = Path(local).expanduser()
    return path if path.is_absolute() else ROOT / path


def main(params: Params) -> None:
    selected = read_json(ROOT / SELECTION)
    dataset = get_dataset(selected["dataset"])
    if dataset.build is not None:
        dataset.build(ROOT / RAW, params.section("embedded", EmbeddedConfig))
        return
    data = params.section("data", DataConfig)
    obtain(
        get_source(dataset, selected["source"]),
        ROOT / RAW,
        downloads=ROOT / data.downloads,
        mirror=data.mirror,
        local=_local(data.local),
        progress=show_progress(),
    )


if __name__ == "__main__":
    run(main, __doc__)
