"""Stage download: obtain the raw data of the selected source into data/raw (built, copied or downloaded)."""

from common import ROOT, Params, local_path, run

from ahl.core.console import show_progress
from ahl.core.io import read_json
from ahl.core.layout import LOCAL, RAW, SELECTION
from ahl.data.datasets import get_source, selected_dataset
from ahl.data.download import DataConfig, obtain
from ahl.data.embedded import EmbeddedConfig


def main(params: Params) -> None:
    selected = read_json(ROOT / SELECTION)
    dataset = selected_dataset(selected)
    if dataset.build is not None:
        dataset.build(ROOT / RAW, params.section("embedded", EmbeddedConfig))
        return
    data = params.section("data", DataConfig)
    obtain(
        get_source(dataset, selected["source"]),
        ROOT / RAW,
        downloads=ROOT / data.downloads,
        mirror=data.mirror,
        local=local_path(data.local),
        progress=show_progress(),
    )


if __name__ == "__main__":
    run(main, __doc__)
