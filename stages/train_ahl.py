"""Stage train_ahl: AHL (HADG tasks, CDL meta-learning, psi task weights) on the cached features -> models/ahl.pt.

The test AUC per epoch is logged (results/ahl_training, a DVC plot) by a callback: training itself never reads
the test labels, and the model kept is the last epoch's.
"""

from __future__ import annotations

import sys

import numpy as np
from common import ROOT, Params, run
from compute import run_device, stage_runtime
from live import live

from ahl.core import provenance
from ahl.core.console import show_progress
from ahl.core.distributed import DistributedConfig, process_group, relaunch
from ahl.core.layout import AHL as OUT
from ahl.core.layout import AHL_LOG as LOG
from ahl.core.layout import BASE, CACHE
from ahl.evaluation.image_metrics import auc_roc_pr
from ahl.method.cache import INDEX, load_cache
from ahl.method.forward import score_features
from ahl.method.init import initial_heads
from ahl.method.train_ahl import AHLConfig, train_ahl
from ahl.models.base import load_base_heads, save_heads


def main(params: Params) -> None:
    # nproc > 1: the same under torchrun (at most one process per GPU, or per core on the CPU)
    relaunch(params.section("distributed", DistributedConfig), sys.argv, run_device(params))
    config = params.section("ahl", AHLConfig)
    cache = load_cache(ROOT / CACHE)
    base_heads, base_meta = load_base_heads(ROOT / BASE)
    provenance.check(CACHE, cache.meta.get("inputs"), "python stages/features.py", base=ROOT / BASE)
    model = base_meta["model"]
    sizes = [tuple(x.shape[-2:]) for x in cache.test.scales]
    heads = initial_heads(base_heads, model, config.official_geometry, sizes)
    with process_group(run_device(params)) as (group, device):
        runtime = stage_runtime(params, device)
        if group.is_main:
            print(
                f"AHL({model}) on {len(cache.train_normal)} normals, {len(cache.train_anomaly)} seen anomalies, "
                f"families {sorted(cache.pseudo)} ({device}{f', {group.world} ranks' if group.world > 1 else ''})"
            )
            _train(params, config, cache, heads, model, runtime, group)
        else:  # this rank's tasks; rank 0 logs, scores the test set and writes
            train_ahl(cache, heads, config, seed=params.seed, device=device, group=group, runtime=runtime)


def _train(params: Params, config: AHLConfig, cache, heads, model: str, runtime, group) -> None:
    device = runtime.device
    with live(ROOT / LOG) as logger:

        def on_epoch(epoch: int, scored) -> dict:
            scores = score_features(cache.test, scored, cache.normal_mean, device, config.eval_batch_size, runtime)
            auc = auc_roc_pr(cache.test.labels, scores) if np.isfinite(scores).all() else None  # diverged: none
            entry = {"test_auc_roc": auc and auc["auc_roc"], "test_auc_pr": auc and auc["auc_pr"]}
            for name, value in entry.items():
                if value is not None:
                    logger.log_metric(name, value)
            logger.next_step()
            return entry

        result = train_ahl(
            cache, heads, config, seed=params.seed, device=device, progress=show_progress(), on_epoch=on_epoch,
            group=group, runtime=runtime,
        )  # fmt: skip
        meta = {
            "model": model,
            "in_channels": int(cache.test.scales[0].shape[1]),
            "feature_dtype": str(cache.test.scales[0].dtype),  # `ahl predict` rounds new features to it
            "topk": result.heads.topk,
            "margin": result.heads.margin,
            "official_geometry": config.official_geometry,
            "members": len(result.heads.members) if not config.cdl else 0,  # > 0: the "no CDL" ensemble
            "ahl": config.to_dict(),
            "clusters": [c.tolist() for c in result.clusters],
            "tasks": len(result.tasks),
            "inputs": provenance.inputs(base=ROOT / BASE, cache=ROOT / CACHE / INDEX),
            # no wall times: the output must be byte-identical for the same inputs (they are in the log)
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
        }
        save_heads(ROOT / OUT, result.heads, meta)


if __name__ == "__main__":
    run(main, __doc__)
