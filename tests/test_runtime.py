"""The runtime section (bfloat16 autocast, channels_last, compile, determinism) on CPU, and seeding that leaves
torch's global generators alone. The CUDA side is exercised by benchmarks/bench_cuda.py on a GPU machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, make_cache, make_heads
from sklearn.metrics import roc_auc_score

from ahl.core.config import from_params, load_yaml
from ahl.core.errors import UserError
from ahl.core.runtime import Runtime, RuntimeConfig, configure_determinism, plain, seeded
from ahl.data.mvtec import load_images, read_subset
from ahl.evaluation.scorer import Scorer
from ahl.method.forward import score_features
from ahl.method.train_ahl import train_ahl
from ahl.models.base import BackboneConfig, Checkpoint, build_model
from ahl.models.train_base import BaseConfig, train_base

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BF16 = Runtime(CPU, torch.bfloat16)
CHANNELS_LAST = Runtime(CPU, None, channels_last=True)
# bfloat16 keeps 8 bits of mantissa (~3 significant digits). Measured here: the largest score change is 4.6 % of
# the float32 scores' range through the backbone (images), 1 % for AHL's heads (features); AUC moves by <= 0.02
BF16_SCORE_TOLERANCE = 0.10  # max |score_bf16 - score_fp32| / (max - min of the float32 scores)
BF16_AUC_TOLERANCE = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def images(small_dataset):
    sub = read_subset(small_dataset, "brick")
    files = list(sub.test_good) + [f for fs in sub.anomalies.values() for f in fs[:2]]
    labels = np.r_[np.zeros(len(sub.test_good)), np.ones(len(files) - len(sub.test_good))]
    return load_images(sub.root, files, 64), labels


@pytest.fixture(scope="module")
def model():
    with seeded(0):
        config = BackboneConfig(name="efficientnet_lite0", image_size=64, n_scales=2)
        return build_model("dra", config, topk=0.1, margin=5.0).eval()


def _normal_mean(model, images):
    with torch.no_grad():
        return [f.mean(0) for f in model.features(torch.from_numpy(images[:3]).permute(0, 3, 1, 2).float() / 255)]


def score_images(model, images, normal_mean, runtime=None) -> np.ndarray:
    """The base model's final scores of ``images`` through the scorer (batches of 8)."""
    scorer = Scorer(Checkpoint(model, normal_mean, {"model": "dra"}), runtime=runtime or plain(CPU))
    return scorer.score_images(images, 8).final["base"]


def test_the_committed_params_load_and_change_nothing_on_cpu(caplog):
    config = from_params(RuntimeConfig, load_yaml(ROOT / "params.yaml")["runtime"], "runtime")
    assert config == RuntimeConfig(autocast="auto", channels_last="auto", compile=False)
    with caplog.at_level("DEBUG", logger="ahl.core.runtime"):
        runtime = Runtime.resolve("cpu", config)
    assert runtime == plain("cpu") and "float32 on cpu" in caplog.text  # auto is float32, with a log line
    assert Runtime.resolve("cpu", dataclasses.replace(config, autocast="bfloat16")).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "section, message",
    [
        ({"autocast": "float16"}, "runtime.autocast must be one of auto, bfloat16, float32"),
        ({"channels_last": "yes"}, "runtime.channels_last must be auto, true or false"),
        ({"compile": "no"}, "runtime.compile = 'no' is not bool"),
        ({"deterministic": True, "cudnn_benchmark": True}, "exclude each other"),
        ({"autocastt": "auto"}, "did you mean 'autocast'"),
    ],
)
def test_bad_runtime_params_are_one_line_errors(section, message):
    raw = {**load_yaml(ROOT / "params.yaml")["runtime"], **section}
    if "autocastt" in section:
        del raw["autocast"]
    with pytest.raises(UserError, match=message):
        from_params(RuntimeConfig, raw, "runtime")


def test_compile_is_off_by_default_and_keeps_parameter_names_when_on():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    keys = list(net.state_dict())
    plain("cpu").prepare(net)
    assert net._compiled_call_impl is None  # eager
    Runtime(CPU, compile=True).prepare(net)  # lazy: nothing is compiled until the first call
    assert net._compiled_call_impl is not None and list(net.state_dict()) == keys


def test_determinism_switches_are_left_alone_by_default():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    configure_determinism(RuntimeConfig())
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_seeded_restores_the_global_generator():
    state = torch.random.get_rng_state()
    with seeded(3):
        a = torch.rand(3)
    with seeded(3):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)


def test_channels_last_gives_the_same_image_scores(model, images):
    x, _ = images
    normal_mean = _normal_mean(model, x)
    expected = score_images(model, x, normal_mean)
    got = score_images(model, x, normal_mean, CHANNELS_LAST)
    model.to(memory_format=torch.contiguous_format)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _close_in_bf16(got: np.ndarray, expected: np.ndarray, labels: np.ndarray) -> None:
    spread = float(expected.max() - expected.min())
    assert np.isfinite(got).all() and not np.array_equal(got, expected)  # bfloat16 did run
    assert np.abs(got - expected).max() <= BF16_SCORE_TOLERANCE * spread
    assert abs(roc_auc_score(labels, got) - roc_auc_score(labels, expected)) <= BF16_AUC_TOLERANCE


def test_bfloat16_autocast_on_cpu_scores_images_within_tolerance(model, images):
    x, labels = images
    normal_mean = _normal_mean(model, x)
    expected = score_images(model, x, normal_mean)
    got = score_images(model, x, normal_mean, BF16)
    _close_in_bf16(got, expected, labels)


def test_bfloat16_autocast_on_cpu_trains_ahl_within_tolerance():
    cache = make_cache()[0]
    config = dataclasses.replace(FAST, epochs=2)
    results = [train_ahl(cache, make_heads(), config, seed=0, device=CPU, runtime=r) for r in (None, BF16)]
    expected, got = (score_features(cache.test, r.heads, cache.normal_mean, CPU, 64) for r in results)
    assert all(np.isfinite(e["outer_loss"]) for e in results[1].history)
    _close_in_bf16(got, expected, cache.test.labels)
    bf16_scores = score_features(cache.test, results[1].heads, cache.normal_mean, CPU, 64, BF16)
    _close_in_bf16(bf16_scores, got, cache.test.labels)


def test_base_training_runs_in_bfloat16_and_channels_last(images):
    x, _ = images
    backbone = BackboneConfig(name="efficientnet_lite0", image_size=64, n_scales=2)
    config = BaseConfig(epochs=1, steps_per_epoch=1, batch_size=6, n_ref=2)
    runtime = Runtime(CPU, torch.bfloat16, channels_last=True)
    ckpt = train_base(x[:8], x[-3:], backbone, config, seed=0, device=CPU, runtime=runtime)
    assert all(r.dtype == torch.float32 and r.is_contiguous() for r in ckpt.normal_mean)
    assert all(p.is_contiguous() for p in ckpt.model.parameters())  # checkpoints hold plain tensors
    assert np.isfinite(ckpt.meta["history"][0]["loss"])


def test_describe_records_the_process_wide_switches_that_change_scores():
    """What thresholds.json and an export record of the runtime: with TF32, cuDNN autotuning and deterministic
    algorithms (was: device, dtype, memory format and compile only, so a TF32 run's thresholds looked like a
    float32 one's)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    try:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = True, True, True
        cpu = Runtime(torch.device("cpu")).describe()
        assert {k: cpu[k] for k in ("device", "dtype", "tf32_matmul", "tf32_cudnn", "cudnn_benchmark")} == {
            "device": "cpu", "dtype": "float32", "tf32_matmul": False, "tf32_cudnn": False,
            "cudnn_benchmark": False}  # fmt: skip
        assert cpu["deterministic"] is torch.are_deterministic_algorithms_enabled()
        cuda = Runtime(torch.device("cuda", 0)).describe()  # describing touches no GPU
        assert cuda["tf32_matmul"] is cuda["tf32_cudnn"] is cuda["cudnn_benchmark"] is True
        matmul.allow_tf32 = False  # each switch on its own: TF32 convolutions with float32 matmuls
        assert {k: Runtime(torch.device("cuda", 0)).describe()[k] for k in ("tf32_matmul", "tf32_cudnn")} == {
            "tf32_matmul": False, "tf32_cudnn": True}  # fmt: skip
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved
