"""Stage train_base: fine-tune the base model (DRA or DevNet) on the split's training data -> models/base.pt."""

import sys

from common import ROOT, Params, run
from compute import run_device, stage_runtime

from ahl.core.console import show_progress
from ahl.core.distributed import DistributedConfig, process_group, relaunch
from ahl.core.io import read_json
from ahl.core.layout import BASE as OUT
from ahl.core.layout import DATA, SPLIT
from ahl.core.provenance import inputs
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.models.base import BackboneConfig, save_checkpoint
from ahl.models.train_base import BaseConfig, train_base


def main(params: Params) -> None:
    # nproc > 1: the same under torchrun (at most one process per GPU, or per core on the CPU)
    relaunch(params.section("distributed", DistributedConfig), sys.argv, run_device(params))
    split = Split.from_dict(read_json(ROOT / SPLIT))
    backbone = params.section("backbone", BackboneConfig)
    config = params.section("base", BaseConfig)
    root = ROOT / DATA / split.classname
    normals = load_images(root, [s.file for s in split.train_normals], backbone.image_size)
    anomalies = load_images(root, [s.file for s in split.train_anomalies], backbone.image_size)
    with process_group(run_device(params)) as (group, device):
        runtime = stage_runtime(params, device)
        ranks = f", {group.world} ranks" if group.world > 1 else ""
        if group.is_main:
            print(
                f"training {config.model} on {len(normals)} normals + {len(anomalies)} seen anomalies ({device}{ranks})"
            )
        ckpt = train_base(
            normals, anomalies, backbone, config, seed=params.seed, device=device, progress=show_progress(),
            group=group, runtime=runtime,
        )  # fmt: skip
        if not group.is_main:  # rank 0 writes the outputs
            return
    ckpt.meta["reference_files"] = [split.train_normals[i].file for i in ckpt.meta["reference_index"]]
    ckpt.meta["classname"] = split.classname
    ckpt.meta["inputs"] = inputs(split=ROOT / SPLIT)
    save_checkpoint(ROOT / OUT, ckpt)


if __name__ == "__main__":
    run(main, __doc__)
