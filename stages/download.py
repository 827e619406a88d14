"""Stage download: obtain the raw data of the selected source into data/raw (built, copied or downloaded)."""

from pathlib import Path

from common import ROOT, run, section

from ahl.config import from_params
from ahl.data.registry import get_dataset, get_source
from ahl.io import read_json
from ahl.runtime import show_progress

SELECTION, RAW = "data/selection.json", "data/raw"


def main(params: dict) -> None:
    selected = read_json(ROOT / SELECTION)
    dataset = get_dataset(selected["dataset"])
    if dataset.build is not None:
        from ahl.data.embedded import EmbeddedConfig

        dataset.build(ROOT / RAW, from_params(EmbeddedConfig, section(params, "embedded"), "embedded"))
        return
    from ahl.data.download import obtain

    data = section(params, "data")
    source = get_source(dataset, selected["source"])
    local = data.get("local")
    obtain(
        source,
        ROOT / RAW,
        downloads=ROOT / data.get("downloads", "data/downloads"),
        mirror=data.get("mirror"),
        local=Path(local).expanduser() if local else None,
        progress=show_progress(),
    )


if __name__ == "__main__":
    run(main, __doc__)
