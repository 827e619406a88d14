"""AHL's meta-gradient on one task under bfloat16 autocast against float32, on a run's feature cache.

    python benchmarks/bf16_meta_gradient.py                 # the workspace's run (after `dvc repro`)
    python benchmarks/bf16_meta_gradient.py --run PATH --tasks 3

For each of the first ``--tasks`` HADG tasks of the run's own AHL setup (params.yaml's ahl section, its seed, its
cache and base heads), one task's support and query batches are gathered once, and CDL's meta-gradient
(ahl/method/cdl.py: task_meta_gradient, the first outer step from the initial heads) is computed twice on the
same batches: forward passes in float32, and under ``torch.autocast(bfloat16)`` as ``runtime.autocast: bfloat16``
runs them. Prints, per task, the relative error ||g_bf16 - g_fp32|| / ||g_fp32|| of the whole gradient, the cosine
similarity of the two, and the query losses. CPU by default (``--device``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "stages")]

from common import Params  # noqa: E402

from ahl.core.config import load_yaml  # noqa: E402
from ahl.core.runtime import Runtime, plain  # noqa: E402
from ahl.method.cache import load_cache  # noqa: E402
from ahl.method.cdl import task_meta_gradient  # noqa: E402
from ahl.method.init import initial_heads  # noqa: E402
from ahl.method.train_ahl import AHLConfig, AHLTrainer  # noqa: E402
from ahl.models.base import load_base_heads  # noqa: E402


def meta_gradient(trainer: AHLTrainer, support, queries, config: AHLConfig, runtime: Runtime):
    """(theta's meta-gradient as one flat float64 vector and per parameter, the query loss) of one task."""
    heads = trainer.heads
    heads.zero_grad(set_to_none=True)
    theta, buffers = dict(heads.named_parameters()), {n: b.clone() for n, b in heads.named_buffers()}
    rounds = [batch for _ in range(config.update_step) for batch in support]
    _, _, loss = task_meta_gradient(
        heads, theta, buffers, iter(rounds), iter(queries), len(queries), trainer.normal_mean,
        weight=1.0, inner_lr=config.inner_lr, second_order=config.second_order, autocast=runtime.autocast,
    )  # fmt: skip
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten() for n, p in theta.items()}
    return grads, loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT, help="a project folder after `dvc repro` (default: this one)")
    p.add_argument("--tasks", type=int, default=3, help="how many tasks to compare (default 3)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    params = Params(load_yaml(args.run / "params.yaml"), args.run / "params.yaml")
    config = params.section("ahl", AHLConfig)
    cache = load_cache(args.run / "cache/features")
    base_heads, meta = load_base_heads(args.run / "models/base.pt")
    sizes = [tuple(x.shape[-2:]) for x in cache.test.scales]
    heads = initial_heads(base_heads, meta["model"], config.official_geometry, sizes)
    device = torch.device(args.device)
    trainer = AHLTrainer(cache, heads, config, params.seed, device)
    split_of = {f: vs[0] for f, vs in trainer.variants.items()}
    n_batches = config.steps_per_epoch // config.outer_steps_per_epoch
    fp32, bf16 = plain(device), Runtime(device, torch.bfloat16, False, False)
    print(f"AHL({meta['model']}) meta-gradient, {args.run}: bfloat16 autocast vs float32 on {device}")
    print("| task | ||g_bf16 - g_fp32|| / ||g_fp32|| | cosine similarity | L_query fp32 | L_query bf16 |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for i, task in enumerate(trainer.tasks[: args.tasks]):
        batches = trainer._batches(task.support_normals, task.support_anomalies, task.support_family, n_batches)
        queries = trainer._batches(task.query_normals, task.query_anomalies, task.query_family, config.query_batches)
        support = [trainer.store.batch(b, split_of) for b in batches]
        query = [trainer.store.batch(b, split_of) for b in queries]
        g32, l32 = meta_gradient(trainer, support, query, config, fp32)
        g16, l16 = meta_gradient(trainer, support, query, config, bf16)
        whole = torch.cat(list(g32.values()))
        rel = float(torch.cat(list(g16.values())).sub(whole).norm() / whole.norm())
        cosine = float(torch.nn.functional.cosine_similarity(torch.cat(list(g16.values())), whole, dim=0))
        worst = max(worst, rel)
        print(f"| {i} | {rel:.4f} | {cosine:.5f} | {l32:.5f} | {l16:.5f} |")
    print(f"largest relative error of the whole meta-gradient: {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
