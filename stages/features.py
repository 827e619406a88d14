"""Stage features: the frozen base model's features of train, test and pseudo-anomaly images -> cache/features."""

import sys

from common import ROOT, Params, run
from compute import run_device, stage_runtime

from ahl.core import provenance
from ahl.core.console import show_progress
from ahl.core.distributed import DistributedConfig, process_group, relaunch
from ahl.core.io import read_json
from ahl.core.layout import BASE, DATA, SPLIT
from ahl.core.layout import CACHE as OUT
from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.method.cache import CacheConfig, write_cache
from ahl.models.base import load_checkpoint


def main(params: Params) -> None:
    # nproc > 1: the same under torchrun (at most one process per GPU, or per core on the CPU)
    relaunch(params.section("distributed", DistributedConfig), sys.argv, run_device(params))
    config = params.section("features", CacheConfig)
    with process_group(run_device(params)) as (group, device):
        _cache(params, config, stage_runtime(params, device), group)


def _cache(params: Params, config: CacheConfig, runtime, group) -> None:
    device = runtime.device
    split = Split.from_dict(read_json(ROOT / SPLIT))
    ckpt = load_checkpoint(ROOT / BASE, device)
    provenance.check(BASE, ckpt.meta.get("inputs"), "python stages/train_base.py", split=ROOT / SPLIT)
    size = ckpt.meta["backbone"]["image_size"]
    root = ROOT / DATA / split.classname

    def part(samples):
        files = [s.file for s in samples]
        return load_images(root, files, size), [s.label for s in samples], [s.cls for s in samples], files

    splits = {
        "train_normal": part(split.train_normals),
        "train_anomaly": part(split.train_anomalies),
        "test": part(split.test),
    }
    if split.validation:  # held out of training; cached so that the calibrate stage scores it with AHL
        splits["validation"] = part(split.validation)
    meta = {
        "classname": split.classname, "model": ckpt.meta["model"], "seen": [s.seen for s in split.test],
        "inputs": provenance.inputs(split=ROOT / SPLIT, base=ROOT / BASE),
    }  # fmt: skip
    write_cache(
        ROOT / OUT, ckpt.model, ckpt.normal_mean, splits, config,
        seed=params.seed, device=device, progress=show_progress() and group.is_main, meta=meta, group=group,
        runtime=runtime,
    )  # fmt: skip
    if not group.is_main:
        return
    n_images = sum(len(p[0]) for p in splits.values())
    print(f"cached features of {n_images} images + {len(config.families)} families in {OUT}")


if __name__ == "__main__":
    run(main, __doc__)
