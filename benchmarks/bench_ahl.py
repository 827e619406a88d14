"""Speed and memory of AHL's training steps at the papers' shapes, against this machine's float32 matmul rate.

    python benchmarks/bench_ahl.py [--full] [--device auto|cpu|cuda] [--bf16] [--official-geometry] [--profile]

DRA heads on [512, 14, 14] + [512, 7, 7] float16 features of a 300-normal class (10 seen anomalies, 3 pseudo
families), 6 tasks x update_step 3 x 20 steps x batch 48. Times one inner step (first and second order), one
task's outer step, and an epoch: by default a reduced epoch (one task, one round of inner steps) extrapolated
to the full one; ``--full`` runs a real epoch of train_ahl. Efficiency = counted FLOPs (FlopCounterMode) of a
step / its time / the dense float32 matmul rate measured in the same run. ``--bf16``: the heads' forward passes
under bfloat16 autocast (params.yaml runtime.autocast); on CUDA the peak GPU memory is printed too.
``--official-geometry``: DRA's composite conv as the official AHL code builds it (stride 3, no padding; about 1/12
of the default's FLOPs), the geometry to compare with the official code's epoch. ``--profile``: torch.profiler's
top operators of one first-order and one second-order inner step.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ahl.core.runtime import Runtime, resolve_device  # noqa: E402
from ahl.method.cache import FeatureCache, FeatureSet  # noqa: E402
from ahl.method.cdl import adapt, query_loss  # noqa: E402
from ahl.method.forward import final_scores, score_features  # noqa: E402
from ahl.method.hadg import HADGConfig, cluster_normals, draw_batch, make_tasks, pool_features  # noqa: E402
from ahl.method.store import FeatureStore  # noqa: E402
from ahl.method.train_ahl import AHLConfig, train_ahl  # noqa: E402
from ahl.models.base import build_heads  # noqa: E402
from ahl.models.labels import NORMAL, PSEUDO, SEEN  # noqa: E402

FAMILIES = ("cutmix", "cutpaste", "draem")


def synthetic_cache(n_normal: int, n_seen: int, n_test: int, channels: int, sizes: tuple[int, ...], seed: int):
    """Random non-negative float16 features (like ReLU outputs) in the layout of a real cache."""
    rng = np.random.default_rng(seed)

    def fs(n, label, cls):
        scales = [
            (0.5 * rng.standard_gamma(1.0, size=(n, channels, s, s), dtype=np.float32)).astype(np.float16)
            for s in sizes
        ]
        return FeatureSet(scales, np.full(n, label, np.int64), [cls] * n, [""] * n)

    normal = fs(n_normal, NORMAL, "good")
    test = fs(n_test, NORMAL, "good")
    test.labels[n_test // 2 :] = 1
    return FeatureCache(
        train_normal=normal,
        train_anomaly=fs(n_seen, SEEN, "seen"),
        pseudo={f: fs(n_normal, PSEUDO, f) for f in FAMILIES},
        test=test,
        normal_mean=[x[:5].astype(np.float32).mean(axis=0) for x in normal.scales],
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul FLOP/s (best of ``repeats``: the machine's attainable rate)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = min(timed(lambda: torch.mm(a, b), device, 1, warmup=1 if k == 0 else 0) for k in range(repeats))
    return 2 * n**3 / best


def matrix_products(fn: Callable[[], object]) -> list[tuple[object, list]]:
    """Every matrix product (mm, addmm, bmm) one call of fn runs: (op, its tensor arguments' (shape, stride))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    calls: list[tuple[object, list]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                calls.append((func, [(a.shape, a.stride()) for a in args if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


def replay(calls: list[tuple[object, list]], device: torch.device) -> Callable[[], None]:
    """The recorded matrix products alone, on random operands of the same shapes and memory layouts."""
    operands = [
        (op, [torch.empty_strided(shape, stride, device=device).normal_() for shape, stride in args])
        for op, args in calls
    ]

    def run() -> None:
        for op, args in operands:
            op(*args)

    return run


def print_profile(fn: Callable[[], object], what: str, rows: int = 12) -> None:
    """torch.profiler's operators of one call of fn, by self time (the note's "top ops")."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"profile: {what}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run one real epoch instead of extrapolating")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--normals", type=int, default=300)
    parser.add_argument("--seen", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast of the heads' forward passes")
    parser.add_argument("--official-geometry", action="store_true", help="the official composite conv (stride 3)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of the inner steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    runtime = Runtime(device, torch.bfloat16 if args.bf16 else None)
    autocast = runtime.autocast
    torch.manual_seed(0)

    config = AHLConfig()  # the paper's defaults: 6 tasks x 3 rounds x 20 steps x batch 48
    cache = synthetic_cache(args.normals, args.seen, 150, 512, (14, 7), seed=0)
    # as train_ahl runs them: channels_last conv weights and features (FeatureStore gathers channels_last)
    heads = build_heads("dra", 512, topk=0.1, margin=5.0, official_geometry=args.official_geometry)
    heads = heads.to(device).to(memory_format=torch.channels_last).train()
    rate = matmul_rate(device)

    clusters = cluster_normals(pool_features(cache.train_normal.scales), HADGConfig(), seed=0)
    rng = np.random.default_rng(0)
    tasks = make_tasks(clusters, args.seen, list(FAMILIES), rng)
    store = FeatureStore(cache, FAMILIES, device)
    split_of = {f: f for f in FAMILIES}
    ref = store.normal_mean
    task = tasks[0]
    theta = dict(heads.named_parameters())
    buffers = dict(heads.named_buffers())

    def support_batch():
        b = draw_batch(task.support_normals, task.support_anomalies, task.support_family, config.batch_size, rng)
        return store.batch(b, split_of)

    def query_batch():
        b = draw_batch(task.query_normals, task.query_anomalies, task.query_family, config.batch_size, rng)
        return store.batch(b, split_of)

    batch = support_batch()
    rows: list[tuple[str, float, float | None]] = []  # (what, seconds, flops)

    gather = timed(support_batch, device, args.repeats)
    rows.append(("gather one batch (float16 -> float32)", gather, None))

    def inner(second_order: bool):
        return lambda: adapt(heads, theta, buffers, [batch], ref, config.inner_lr, second_order, autocast)

    step = {}  # second_order -> (what, seconds, flops)
    for order, label in ((False, "inner step, first order"), (True, "inner step, second order (create_graph)")):
        rows.append((label, timed(inner(order), device, args.repeats), flops(inner(order))))
        step[order] = rows[-1]
        if not order:  # what no overhead removal can beat: the step's matrix products alone
            products = replay(matrix_products(inner(order)), device)
            rows.append(("  its matrix products alone (replayed)", timed(products, device, args.repeats), flops(products)))
            floor = rows[-1]
            # rounds 2 and 3 revisit a support batch: its memo is filled (train_ahl)
            revisit = functools.partial(
                adapt, heads, theta, buffers, [(*batch, [{} for _ in batch[0]])], ref, config.inner_lr, False, autocast
            )
            revisit()
            rows.append(("inner step, first order, a later round (memo filled)", timed(revisit, device, args.repeats),
                         flops(revisit)))  # fmt: skip
            t_later = rows[-1][1]
        if args.profile:
            print_profile(inner(order), label)

    def forward_only():
        with torch.no_grad(), autocast():
            heads(batch[0], ref)

    rows.append(("forward only, batch 48", timed(forward_only, device, args.repeats), flops(forward_only)))

    def outer_one_task(n_inner: int):
        def run():
            phi, _ = adapt(
                heads, theta, buffers, [batch] * n_inner, ref, config.inner_lr, config.second_order, autocast
            )
            query_loss(heads, phi, buffers, *batch, ref, autocast).backward()
            heads.zero_grad(set_to_none=True)

        return run

    # the query pass of one task: adapted with its (second order) first step, then L_query's backward
    query_only = timed(outer_one_task(1), device, args.repeats) - step[True][1]
    q_flops = flops(outer_one_task(1)) - step[True][2]
    rows.append(("outer step of one task: query fwd + backward through step 1", query_only, q_flops))

    pool_n = len(np.concatenate(clusters)) + args.seen + 3 * config.pool_pseudo_per_family
    chunks = [store.rows("normal", np.arange(config.eval_batch_size))]  # channels_last, as train_ahl gathers
    per_chunk = timed(lambda: final_scores(heads, theta, buffers, chunks, ref, autocast), device, args.repeats)
    pool_time = per_chunk * pool_n / config.eval_batch_size
    rows.append((f"score psi's pool ({pool_n} samples) with one phi_i", pool_time, None))
    test_time = timed(
        lambda: score_features(cache.test, heads, cache.normal_mean, device, config.eval_batch_size, runtime), device, 1
    )
    rows.append((f"score the test set ({len(cache.test)} images)", test_time, None))

    t = len(tasks)
    n_inner = config.update_step * config.steps_per_epoch
    t_fo, t_so = step[False][1], step[True][1]
    # reduced epoch: one task, one round of steps_per_epoch inner steps, its query pass, its pool scoring
    reduced = timed(outer_one_task(config.steps_per_epoch), device, 1, warmup=0) + pool_time
    rows.append((f"reduced epoch: 1 task x 1 round x {config.steps_per_epoch} steps (+ query, pool)", reduced, None))
    # train_ahl gathers each of a task's steps_per_epoch support batches once for its update_step rounds
    # the first round's steps gather and fill the memos; the later rounds' reuse them
    n_first = config.steps_per_epoch
    inner_time = t_so + (n_first - 1) * t_fo + (n_inner - n_first) * t_later
    task_time = inner_time + query_only + pool_time + config.steps_per_epoch * gather
    epoch_est = t * task_time + test_time
    rows.append((f"epoch, extrapolated: {t} tasks x {n_inner} inner steps", epoch_est, None))
    if args.full:
        # k-means on pooled features, as above: on these random features the flattened maps (params.yaml's
        # default) leave one cluster too small, i.e. 2 tasks instead of 6, and the epoch would not be comparable
        full = AHLConfig(epochs=1, hadg=HADGConfig(features="pooled"))
        start = time.perf_counter()
        result = train_ahl(cache, heads.cpu(), full, seed=0, device=device, runtime=runtime)
        seconds = time.perf_counter() - start
        rows.append((f"epoch, measured (train_ahl, epochs=1, {len(result.tasks)} tasks)", seconds, None))

    epoch_flops = t * (step[True][2] + (n_inner - 1) * step[False][2] + q_flops)
    # the reference rate once more at the end, and the better of the two: this machine's speed drifts (a shared
    # VM: 78-148 GFLOP/s within one afternoon), and a percentage of a slow moment's rate would flatter the steps
    rates = (rate, matmul_rate(device))
    rate = max(rates)
    precision = "bfloat16 autocast" if args.bf16 else "float32"
    geometry = "official geometry (composite conv stride 3)" if args.official_geometry else "default geometry"
    print(f"device {device} ({torch.get_num_threads()} threads, {precision}, {geometry}), torch {torch.__version__}, "
          f"load {os.getloadavg()}")  # fmt: skip
    print(
        f"dense float32 matmul 2048x2048: {rate / 1e9:.1f} GFLOP/s (the better of {rates[0] / 1e9:.1f} at the start "
        f"and {rates[1] / 1e9:.1f} at the end)"
    )
    print(f"{'what':<66} {'time':>10} {'GFLOP':>8} {'GFLOP/s':>8} {'% mm':>6}")
    for what, sec, fl in rows:
        if fl:
            achieved = fl / sec
            print(
                f"{what:<66} {sec * 1e3:>8.1f}ms {fl / 1e9:>8.1f} {achieved / 1e9:>8.1f} {100 * achieved / rate:>5.0f}%"
            )
        else:
            print(f"{what:<66} {sec * 1e3:>8.1f}ms")
    print(
        f"epoch FLOPs (inner + query, counted): {epoch_flops / 1e12:.2f} TFLOP; at the matmul rate: "
        f"{epoch_flops / rate:.1f} s; 30 epochs extrapolated: {30 * epoch_est / 60:.1f} min"
    )
    print(
        f"the epoch's {t * n_inner} inner steps at the replayed matrix products' time (no other op, no overhead): "
        f"{t * n_inner * floor[1]:.1f} s; their measured time: {t * inner_time:.1f} s"
    )
    print(f"peak RSS: {peak_rss_gb():.2f} GB (target <= 4 GB); efficiency target >= 50 % of matmul")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
