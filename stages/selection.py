"""Stage selection: check params.yaml in full, then classname -> the dataset and source it needs (data/selection.json).

Every section is checked against its dataclass here, at the start of the pipeline, so a typo or a bad value in
any section stops `dvc repro` before anything is downloaded or trained. Downstream, download and convert depend
on data/selection.json rather than on `classname`, so switching to another subset of the same dataset leaves
them untouched (DVC sees an identical file). Your own data (`data.local` holding a folder named `classname`) is
checked here too (layout, anomalies, enough for M), so a mistake in it stops the pipeline before anything runs.
"""

from common import ROOT, SECTIONS, Params, local_path, run

from ahl.core.distributed import DistributedConfig
from ahl.core.io import write_json
from ahl.core.layout import SELECTION as OUT
from ahl.core.runtime import RuntimeConfig, resolve_device
from ahl.data.datasets import select
from ahl.data.download import DataConfig
from ahl.data.embedded import EmbeddedConfig
from ahl.data.protocol import ProtocolConfig
from ahl.evaluation.image_metrics import EvaluateConfig
from ahl.evaluation.threshold import ThresholdConfig
from ahl.method.cache import CacheConfig
from ahl.method.train_ahl import AHLConfig
from ahl.models.base import BackboneConfig
from ahl.models.train_base import BaseConfig

CONFIGS = {
    "data": DataConfig, "embedded": EmbeddedConfig, "protocol": ProtocolConfig, "backbone": BackboneConfig,
    "base": BaseConfig, "features": CacheConfig, "ahl": AHLConfig, "evaluate": EvaluateConfig,
    "threshold": ThresholdConfig, "distributed": DistributedConfig, "runtime": RuntimeConfig,
}  # fmt: skip
assert tuple(CONFIGS) == SECTIONS, "stages/common.py SECTIONS and the configs checked here must agree"


def check(params: Params) -> None:
    """Every section of params.yaml against its dataclass, and the device; a UserError names what is wrong."""
    for name, cls in CONFIGS.items():
        params.section(name, cls)
    resolve_device(params.device)


def main(params: Params) -> None:
    check(params)
    data, protocol = params.section("data", DataConfig), params.section("protocol", ProtocolConfig)
    write_json(ROOT / OUT, select(params.classname, local_path(data.local), protocol))


if __name__ == "__main__":
    run(main, __doc__)
