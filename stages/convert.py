"""Stage convert: raw data -> MVTec layout in data/mvtec (validated; datasets already in that layout are linked)."""

from common import ROOT, run, section

from ahl.data.mvtec import validate_dataset
from ahl.data.registry import get_dataset
from ahl.io import read_json

SELECTION, RAW, OUT = "data/selection.json", "data/raw", "data/mvtec"


def main(params: dict) -> None:
    dataset = get_dataset(read_json(ROOT / SELECTION)["dataset"])
    seed = int(section(params, "data").get("split_seed", 42))
    if dataset.converter is None:
        from ahl.data.converters import convert_mvtec as converter  # already MVTec layout: link and validate
    else:
        converter = dataset.converter
    converter(ROOT / RAW, ROOT / OUT, seed=seed)
    subsets = validate_dataset(ROOT / OUT)
    print(f"{dataset.name}: {len(subsets)} subset(s) in {OUT}: {', '.join(subsets)}")


if __name__ == "__main__":
    run(main, __doc__)
