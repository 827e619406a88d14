"""Stage train_base: fine-tune the base model (DRA or DevNet) on the split's training data -> models/base.pt."""

from common import ROOT, Params, run

from ahl.data.mvtec import load_images
from ahl.data.protocol import Split
from ahl.io import read_json
from ahl.model import BackboneConfig, save_checkpoint
from ahl.provenance import inputs
from ahl.runtime import show_progress
from ahl.train import BaseConfig, train_base

DATA, SPLIT, OUT = "data/mvtec", "data/split.json", "models/base.pt"


def main(params: Params) -> None:
    split = Split.from_dict(read_json(ROOT / SPLIT))
    backbone = params.section("backbone", BackboneConfig)
    config = params.section("base", BaseConfig)
    runtime = params.runtime()
    device = runtime.device
    root = ROOT / DATA / split.classname
    normals = load_images(root, [s.file for s in split.train_normals], backbone.image_size)
    anomalies = load_images(root, [s.file for s in split.train_anomalies], backbone.image_size)
    print(f"training {config.model} on {len(normals)} normals + {len(anomalies)} seen anomalies ({device})")
    ckpt = train_base(
        normals, anomalies, backbone, config, seed=params.seed, device=device, progress=show_progress(), runtime=runtime
    )
    ckpt.meta["reference_files"] = [split.train_normals[i].file for i in ckpt.meta["reference_index"]]
    ckpt.meta["classname"] = split.classname
    ckpt.meta["inputs"] = inputs(split=ROOT / SPLIT)
    save_checkpoint(ROOT / OUT, ckpt)


if __name__ == "__main__":
    run(main, __doc__)
