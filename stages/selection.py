"""Stage selection: check params.yaml in full, then classname -> the dataset and source it needs (data/selection.json).

Every section is checked against its dataclass here, at the start of the pipeline, so a typo or a bad value in
any section stops `dvc repro` before anything is downloaded or trained. Downstream, download and convert depend
on data/selection.json rather than on `classname`, so switching to another subset of the same dataset leaves
them untouched (DVC sees an identical file).
"""

from common import ROOT, SECTIONS, Params, run

from ahl.data.download import DataConfig
from ahl.data.embedded import EmbeddedConfig
from ahl.data.protocol import ProtocolConfig
from ahl.data.datasets import resolve
from ahl.features import CacheConfig
from ahl.io import write_json
from ahl.metrics import EvaluateConfig
from ahl.model import BackboneConfig
from ahl.runtime import RuntimeConfig, resolve_device
from ahl.train import BaseConfig
from ahl.trainer import AHLConfig

OUT = "data/selection.json"
CONFIGS = {
    "data": DataConfig, "embedded": EmbeddedConfig, "protocol": ProtocolConfig, "backbone": BackboneConfig,
    "base": BaseConfig, "features": CacheConfig, "ahl": AHLConfig, "evaluate": EvaluateConfig,
    "runtime": RuntimeConfig,
}  # fmt: skip
assert tuple(CONFIGS) == SECTIONS, "stages/common.py SECTIONS and the configs checked here must agree"


def check(params: Params) -> None:
    """Every section of params.yaml against its dataclass, and the device; a UserError names what is wrong."""
    for name, cls in CONFIGS.items():
        params.section(name, cls)
    resolve_device(params.device)


def main(params: Params) -> None:
    check(params)
    selection = resolve(params.classname)
    write_json(ROOT / OUT, {"dataset": selection.dataset, "source": selection.source})


if __name__ == "__main__":
    run(main, __doc__)
