"""Stage convert: raw data -> MVTec layout in data/mvtec (validated; datasets already in that layout are linked)."""

from common import ROOT, Params, run

from ahl.core.io import read_json
from ahl.core.layout import DATA as OUT
from ahl.core.layout import RAW, SELECTION
from ahl.data.datasets import selected_dataset
from ahl.data.download import DataConfig
from ahl.data.mvtec import validate_dataset


def main(params: Params) -> None:
    data = params.section("data", DataConfig)
    dataset = selected_dataset(read_json(ROOT / SELECTION), data.max_pixels)
    dataset.convert(ROOT / RAW, ROOT / OUT, seed=data.split_seed)
    subsets = validate_dataset(ROOT / OUT)
    print(f"{dataset.name}: {len(subsets)} subset(s) in {OUT}: {', '.join(subsets)}")


if __name__ == "__main__":
    run(main, __doc__)
