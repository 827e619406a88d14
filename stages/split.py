"""Stage split: the open-set protocol for `classname` -> data/split.json (seen anomalies, test set)."""

from common import ROOT, Params, run

from ahl.core.io import write_json
from ahl.core.layout import DATA
from ahl.core.layout import SPLIT as OUT
from ahl.data.mvtec import read_subset
from ahl.data.protocol import ProtocolConfig, make_split


def main(params: Params) -> None:
    classname = params.classname  # the selection stage checked it: registered, or your own folder
    config = params.section("protocol", ProtocolConfig)
    split = make_split(read_subset(ROOT / DATA, classname), config, seed=params.seed, classname=classname)
    write_json(ROOT / OUT, split.to_dict())
    print(f"{classname} ({split.setting} setting): {split.summary()}; seen classes: {split.seen_classes}")


if __name__ == "__main__":
    run(main, __doc__)
