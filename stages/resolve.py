"""Stage resolve: classname -> the dataset and the source it needs (data/selection.json).

Downstream, download and convert depend on this file rather than on `classname`, so switching to another
subset of the same dataset leaves them untouched (DVC sees an identical file).
"""

from common import ROOT, run

from ahl.data.registry import resolve
from ahl.io import write_json

OUT = "data/selection.json"


def main(params: dict) -> None:
    selection = resolve(str(params.get("classname")))
    write_json(ROOT / OUT, {"dataset": selection.dataset, "source": selection.source})


if __name__ == "__main__":
    run(main, __doc__)
