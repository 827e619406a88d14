"""Stage train_ahl: AHL (HADG tasks, CDL meta-learning, psi task weights) on the cached features -> models/ahl.pt."""

from __future__ import annotations

from common import ROOT, run, section

from ahl.cdl import AHLConfig, train_ahl
from ahl.config import from_params
from ahl.features import load_cache
from ahl.errors import UserError
from ahl.heads import build_heads
from ahl.io import write_json
from ahl.model import load_checkpoint, save_heads
from ahl.runtime import resolve_device, show_progress

CACHE, BASE, OUT, EPOCHS = "cache/features", "models/base.pt", "models/ahl.pt", "results/ahl_epochs.json"


def main(params: dict) -> None:
    config = from_params(AHLConfig, section(params, "ahl"), "ahl")
    config.validate()
    device = resolve_device(str(params.get("device", "auto")))
    cache = load_cache(ROOT / CACHE)
    base = load_checkpoint(ROOT / BASE, "cpu")
    print(
        f"AHL({base.meta['model']}) on {len(cache.train_normal)} normals, {len(cache.train_anomaly)} seen anomalies, "
        f"families {sorted(cache.pseudo)} ({device})"
    )
    heads = base.model.heads
    if config.official_geometry:
        sizes = [tuple(x.shape[-2:]) for x in cache.test.scales]
        if min(min(size) for size in sizes) < 3:
            raise UserError(
                f"ahl.official_geometry (composite conv 3x3, stride 3, no padding) needs feature maps of at least "
                f"3x3, but the cached ones are {sizes}; raise backbone.image_size (papers: 448 -> 14x14 and 7x7)"
            )
        heads = build_heads(base.meta["model"], heads.seen_head.conv.in_channels, topk=base.meta["topk"], official_geometry=True)
        heads.load_state_dict(base.model.heads.state_dict())
    result = train_ahl(cache, heads, config, seed=int(params.get("seed", 0)), device=device, progress=show_progress())
    members = len(result.heads.members) if hasattr(result.heads, "members") else 0
    meta = {
        "model": base.meta["model"],
        "in_channels": int(cache.test.scales[0].shape[1]),
        "topk": base.meta["topk"],
        "official_geometry": config.official_geometry,
        "members": members,  # > 0: the "no CDL" ablation, an ensemble of independently trained heads
        "ahl": config.to_dict(),
        "clusters": [c.tolist() for c in result.clusters],
        "tasks": len(result.tasks),
        # no wall times: the output must be byte-identical for the same inputs (they are in the log)
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
    }
    save_heads(ROOT / OUT, result.heads, meta)
    write_json(
        ROOT / EPOCHS,
        [{"epoch": h["epoch"], "test_auc_roc": h["test_auc_roc"], "outer_loss": h["outer_loss"]} for h in result.history],
    )


if __name__ == "__main__":
    run(main, __doc__)
