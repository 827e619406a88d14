"""`ahl serve`: the real service (uvicorn) in a subprocess on a free loopback port, with torch, timm, dvc and yaml
unimportable, over the tiny run's ONNX export. Its scores are `ahl infer`'s; bad requests are one line and a 4xx;
labels land in an own-data folder named by their sha256 with an audit row; the loop back into training runs
through the real DVC pipeline."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import Repo, tiny_params
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ahl.deploy import cli

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "timm", "torchvision", "dvc", "dvclive", "sklearn", "yaml", "tqdm")  # none in .[deploy]
MARKUP = '<b onmouseover="alert(1)">crack&co'  # a class name that is markup: shown as text, never as markup
FORMULA = '=HYPERLINK("x")'  # a class name a spreadsheet would run


def _blocked(code: str) -> str:
    return f"import sys\nfor name in {BLOCKED!r}: sys.modules[name] = None\n{code}"


def export_run(repo: Path, out: Path) -> Path:
    """`ahl export` of the run in ``repo`` (its ONNX model, the default) into ``out``."""
    res = subprocess.run([sys.executable, "-m", "ahl.deploy.cli", "export", "--out", str(out)], cwd=repo,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(export: Path, log: Path, *args: str):
    """`ahl serve` over ``export`` until the block ends (stopped however it ends); yields its base URL."""
    port = _free_port()
    argv = ["serve", "--export", str(export), "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _blocked(f"from ahl.deploy import cli\ncli.main({argv!r})")],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a generous bound around the wait for the first model run
        while True:
            assert proc.poll() is None, f"ahl serve exited with {proc.returncode}: {log.read_text()}"
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"ahl serve not ready after 180 s: {log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def export(reproduced, tmp_path_factory) -> Path:
    return export_run(reproduced[0].path, tmp_path_factory.mktemp("serve") / "deploy")


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """The service with labels on (an empty own-data folder), small limits to test them."""
    work = tmp_path_factory.mktemp("served")
    (work / "own").mkdir()
    limits = ["--max-bytes", "200000", "--max-images", "24", "--max-pixels", "5000"]
    with serving(export, work / "log", "--labels", str(work / "own"), *limits) as url:
        yield url, work / "own"


def _test_files(repo: Path) -> list[Path]:
    """The reproduced demo's test images (brick)."""
    return sorted((repo / "data/mvtec/brick/test").rglob("*.png"))


def _post(url: str, files: list[Path]) -> list[dict]:
    res = requests.post(f"{url}/v1/score", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert res.status_code == 200, res.text
    return res.json()["results"]


def test_scores_over_http_are_ahl_infers(server, export, reproduced, tmp_path):
    """The demo's test images through HTTP (one request of 6 files, the rest one raw body each, 8 clients at once)
    against `ahl infer` on the same files: the same scores, decisions and borderline flags."""
    url, _ = server
    files = _test_files(reproduced[0].path)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, folder / f"{i:03d}_{f.parent.name}.png")
    code = f"from ahl.deploy import cli\ncli.main({['infer', str(folder), '--export', str(export), '--out', str(tmp_path / 'line.csv')]!r})"
    res = subprocess.run([sys.executable, "-c", _blocked(code)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    line = pd.read_csv(tmp_path / "line.csv")
    line["sha256"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in line["path"]]

    def one(path: Path) -> dict:
        res = requests.post(f"{url}/v1/score", data=path.read_bytes(), headers={"Content-Type": "image/png"})
        assert res.status_code == 200, res.text
        return res.json()["results"][0]

    answers = _post(url, files[:6])
    with ThreadPoolExecutor(8) as pool:
        answers += list(pool.map(one, files[6:]))
    served = pd.DataFrame(answers).set_index("sha256").loc[line["sha256"]]
    printed = pd.read_csv(tmp_path / "line.csv", dtype=str)["score"]  # infer writes 6 significant digits
    assert [f"{v:.6g}" for v in served["score"]] == list(printed)
    assert (served["is_anomaly"].to_numpy() == line["is_anomaly"].to_numpy()).all()
    assert (served["borderline"].to_numpy() == line["borderline"].to_numpy()).all()
    assert set(served["decision"]) == {"anomaly", "normal"}
    meta = json.loads((export / "metadata.json").read_text())
    first = answers[0]
    assert first["threshold"] == meta["threshold"] and first["tolerance"] == meta["tolerance"]
    assert first["rule"]["compare"] == "score > threshold" and first["rule"]["chosen_by"] == "fpr"
    assert first["model"] == {"name": "AHL(dra)", "kind": "ahl", "sha256": meta["files"]["model.onnx"]}
    assert set(first["head_scores"]) == set(meta["head_names"])
    heat = requests.get(url + first["heatmap"])
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(heat.content)) as im, Image.open(files[0]) as original:
        assert im.size == original.size  # drawn over the image at its own size
    families = {m.name: m for m in text_string_to_metric_families(requests.get(f"{url}/metrics").text)}
    batches = next(s.value for s in families["ahl_batch_images"].samples if s.name.endswith("_count"))
    scored = sum(s.value for s in families["ahl_decisions"].samples if s.name.endswith("_total"))
    assert scored >= len(files) and batches < scored  # the request of 6 was scored as one batch at least
    seconds = [s for s in families["ahl_request_seconds"].samples if s.labels.get("route") == "/v1/score"]
    assert seconds and families["ahl_requests"].samples


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="WEBP")
    return buf.getvalue()


def test_bad_requests_are_one_line_and_a_4xx(server, reproduced):
    url, own = server
    png = _test_files(reproduced[0].path)[0].read_bytes()
    posted = _post(url, [_test_files(reproduced[0].path)[0]])[0]
    cases = [
        (dict(data=b"not an image", headers={"Content-Type": "image/png"}), 415, "body: not an image"),
        (dict(files=[("image", ("x.png", b"hello", "image/png"))]), 415, "x.png: not an image"),
        (dict(files=[("image", ("cut.png", png[:200], "image/png"))]), 400, "cut.png"),
        (dict(data=b""), 400, "no image in the request"),
        (dict(data=_png((100, 100))), 400, "5,000"),  # 10,000 pixels, above --max-pixels
        (dict(data=b"\x89PNG" + bytes(300000)), 413, "the limit is 200,000 (--max-bytes)"),
        (dict(files=[("image", (f"{i}.png", png, "image/png")) for i in range(25)]), 413, "(--max-images)"),
        (dict(data=iter([png])), 411, "not Transfer-Encoding"),  # chunked: no Content-Length to check (review)
        (dict(files=[("image", ("w.webp", _webp(), "image/webp"))]), 415, "w.webp: not an image"),  # data.local
    ]
    for kwargs, status, fragment in cases:
        res = requests.post(f"{url}/v1/score", **kwargs)
        assert (res.status_code, fragment in res.json()["error"]) == (status, True), (fragment, res.text)
        assert "\n" not in res.json()["error"] and "Traceback" not in res.text
    labels = [
        (dict(data=b"{", headers={"Content-Type": "application/json"}), 400, "send JSON"),
        (dict(json={"id": "f" * 64, "label": "good"}), 404, "no recent image"),
        (dict(json={"id": posted["id"], "label": "../up"}), 400, "cannot name a defect class"),
        (dict(json={"id": posted["id"], "label": ".hidden"}), 400, "cannot name a defect class"),
        (dict(json={"id": posted["id"], "label": "ground_truth"}), 400, "cannot name a defect class"),
        (dict(json={"id": posted["id"], "label": "\udc80x"}), 400, "cannot name a defect class"),  # unpaired
        (dict(json={"id": posted["id"], "label": "\U0001f600" * 40}), 400, "128 bytes"),  # 40 chars, 160 bytes
    ]
    for kwargs, status, fragment in labels:
        res = requests.post(f"{url}/v1/labels", **kwargs)
        assert (res.status_code, fragment in res.json()["error"]) == (status, True), (fragment, res.text)
    rebound = requests.get(f"{url}/", headers={"Host": "rebound.example"})  # a DNS-rebinding site's name
    assert rebound.status_code == 400 and "dvc repro" not in rebound.text
    missing = requests.get(f"{url}/v1/heatmaps/{'0' * 64}.png")
    assert missing.status_code == 404 and "no recent image" in missing.json()["error"]
    assert not list(own.rglob("*.png"))  # nothing was labelled


def test_labels_land_in_the_own_data_folder_by_sha256_with_an_audit_row(server, export, reproduced):
    """good -> <classname>/train/good, a defect (here a new class whose name is markup, and one a spreadsheet
    would run) -> <classname>/test/<class>; the bytes as uploaded; the same label again changes nothing, another
    label is refused; no temporary file is left; the page shows the markup as text."""
    url, own = server
    files = _test_files(reproduced[0].path)[-3:]
    answers = _post(url, files)
    wanted = ["good", MARKUP, FORMULA]
    written = []
    for answer, label in zip(answers, wanted):
        res = requests.post(f"{url}/v1/labels", json={"id": answer["id"], "label": label})
        assert res.status_code == 200, res.text
        written.append(own / res.json()["file"])
    brick = own / "brick"
    assert written == [brick / "train/good" / f"{answers[0]['sha256']}.png",
                       brick / "test" / MARKUP / f"{answers[1]['sha256']}.png",
                       brick / "test" / FORMULA / f"{answers[2]['sha256']}.png"]  # fmt: skip
    assert [w.read_bytes() for w in written] == [f.read_bytes() for f in files]
    again = requests.post(f"{url}/v1/labels", json={"id": answers[1]["id"], "label": MARKUP})
    assert again.status_code == 200 and own / again.json()["file"] == written[1]
    other = requests.post(f"{url}/v1/labels", json={"id": answers[1]["id"], "label": "good"})
    assert other.status_code == 409 and "already labelled" in other.json()["error"]
    assert not [p for p in own.rglob("*") if p.name.startswith(".")]
    with open(own / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    meta = json.loads((export / "metadata.json").read_text())
    assert [r["label"] for r in rows] == ["good", MARKUP, "'" + FORMULA]  # a formula is written as text
    assert [r["sha256"] for r in rows] == [a["sha256"] for a in answers]
    assert all(r["model"] == "AHL(dra)" and r["model_sha256"] == meta["files"]["model.onnx"] for r in rows)
    assert [float(r["score"]) for r in rows] == pytest.approx([a["score"] for a in answers], abs=1e-5)
    html = requests.get(f"{url}/").text
    assert MARKUP not in html and "&lt;b onmouseover=&quot;alert(1)&quot;&gt;crack&amp;co" in html
    assert "dvc repro" in html and "dvc metrics diff" in html and f"data.local: {own}" in html
    flagged = requests.get(f"{url}/?show=flagged&sort=score").text
    assert flagged.count('class="card anomaly') > 0 and 'class="card"' not in flagged  # anomalies only


def test_labelling_needs_a_token_off_loopback_and_refuses_other_sites(export, tmp_path, capsys):
    for argv, message in [
        (["--host", "0.0.0.0", "--labels", str(tmp_path)], "labelling needs --token-file"),
        (["--labels", str(tmp_path), "--token-file", str(tmp_path / "none")], "give a readable file"),
        (["--labels", str(tmp_path / "absent")], "--labels"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "--export", str(export), *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "token").write_text("s3cret-token-of-16+chars\n")
    (tmp_path / "own").mkdir()
    args = ["--labels", str(tmp_path / "own"), "--token-file", str(tmp_path / "token")]
    with serving(export, tmp_path / "log", *args) as url:
        answer = requests.post(f"{url}/v1/score", data=_png()).json()["results"][0]
        body = {"id": answer["id"], "label": "good"}
        assert requests.post(f"{url}/v1/labels", json=body).status_code == 403
        wrong = requests.post(f"{url}/v1/labels", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and "token" in wrong.json()["error"]
        foreign = requests.post(f"{url}/review/label", data={**body, "token": "s3cret-token-of-16+chars"},
                                headers={"Origin": "http://elsewhere.example"})  # fmt: skip
        assert foreign.status_code == 403 and not list((tmp_path / "own").rglob("*.png"))
        page = requests.post(f"{url}/review/label", data={**body, "token": "s3cret-token-of-16+chars"})
        assert page.status_code == 200 and "labelled body as good" in page.text
        assert len(list((tmp_path / "own").rglob("*.png"))) == 1


def _chromium():
    """Debian's Chromium, headless, through its own chromedriver (selenium's driver download needs internet)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path("/usr/bin/chromium").is_file() and Path("/usr/bin/chromedriver").is_file()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_the_review_page_in_a_real_browser(server, reproduced, tmp_path):
    """Chromium opens the page, uploads an image (its file name is markup too), sees its score and its heatmap,
    labels it as a new class whose name is markup, and the file is in the labels folder; both names are shown as
    text, never run. The screenshot is docs/review-page.png's source."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, own = server
    name, label = "<i>odd.png", "<img src=x onerror=alert(2)>scuff"
    image = tmp_path / name
    with Image.open(_test_files(reproduced[0].path)[-4]) as im:  # new bytes (the page has not shown them yet)
        im.save(image, format="PNG", compress_level=1)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    driver = _chromium()
    try:
        driver.get(f"{url}/")
        driver.find_element(By.CSS_SELECTOR, 'input[type="file"][name="image"]').send_keys(str(image))
        driver.find_element(By.CSS_SELECTOR, 'form[action="/review/upload"] button').click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, '[role="status"]'))
        card = driver.find_element(By.ID, f"r-{sha}")
        assert card.find_element(By.CLASS_NAME, "name").text == name
        score = float(card.find_element(By.CLASS_NAME, "score").text)
        heat = card.find_element(By.TAG_NAME, "img")
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return arguments[0].complete", heat))
        assert driver.execute_script("return arguments[0].naturalWidth", heat) == 64  # the heatmap, decoded
        card.find_element(By.NAME, "new_label").send_keys(label)
        card.find_element(By.CSS_SELECTOR, 'form[action="/review/label"] button').click()
        status = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, '[role="status"]'))
        assert status.text.startswith(f"labelled {name} as {label}: brick/test/")
        assert driver.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == [] and not driver.find_elements(By.TAG_NAME, "i")
        assert (own / "brick" / "test" / label / f"{sha}.png").read_bytes() == image.read_bytes()
        shown = driver.find_element(By.ID, f"r-{sha}")
        assert f"labelled: {label}" in shown.text and f"{score:.4f}" in shown.text
        driver.save_screenshot(str(tmp_path / "review-page.png"))
    finally:
        driver.quit()
    with Image.open(tmp_path / "review-page.png") as im:
        assert im.format == "PNG" and im.width >= 800


@pytest.mark.pipeline
def test_labels_flow_back_into_training_through_dvc(small_dataset, tmp_path_factory):
    """A run trained on an own-data folder (brick's images as `mine`), exported and served; two flagged images
    (grass, which this model never saw) labelled through the API as a new defect class into that folder; then
    `dvc repro` reruns from the changed data, the new class is among the run's anomalies, and `dvc metrics diff`
    shows the change."""
    local = tmp_path_factory.mktemp("mydata")
    shutil.copytree(small_dataset / "brick", local / "mine")
    repo = Repo(tmp_path_factory.mktemp("loop"), tiny_params({"classname": "mine", "data": {"local": str(local)}}))
    repo.dvc("repro")
    repo.git("add", "-A")
    repo.git("commit", "-qm", "trained on mine")
    deploy = export_run(repo.path, repo.path / "deploy")
    grass = sorted(p for p in (small_dataset / "grass" / "test").rglob("*.png") if p.parent.name != "good")
    with serving(deploy, repo.path / "serve.log", "--labels", str(local)) as url:
        flagged = [a for a in _post(url, grass) if a["is_anomaly"]][:2]
        assert len(flagged) == 2, "the brick model flags fewer than two grass images"
        for answer in flagged:
            res = requests.post(f"{url}/v1/labels", json={"id": answer["id"], "label": "grass_patch"})
            assert res.status_code == 200, res.text
    assert len(list((local / "mine" / "test" / "grass_patch").iterdir())) == 2
    ran = repo.ran(repo.dvc("repro").stdout)
    assert {"local_manifest", "download", "convert", "split", "train_base", "evaluate"} <= ran
    split = json.loads((repo.path / "data/split.json").read_text())
    classes = {s["cls"] for part in ("train", "test") for s in split[part]}
    assert "grass_patch" in classes, sorted(c for c in classes if c)
    diff = repo.dvc("metrics", "diff", "--json").stdout
    assert "results/metrics.json" in json.loads(diff), diff


def test_the_batcher_survives_a_failing_runtime_and_a_client_gone():
    """A batch whose runtime call fails while one of its clients has gone (its future cancelled): the others get
    the error, and the next request is still scored (was: setting the error on the cancelled future raised
    InvalidStateError and ended the batching loop, so every later request waited forever)."""
    import asyncio

    from ahl.deploy.station import Batcher

    calls = []

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(images))
        if len(calls) == 1:
            time.sleep(0.2)  # the first client goes away meanwhile
            raise RuntimeError("the runtime failed")
        return {"score": images.reshape(len(images), -1).mean(1)}

    async def main() -> None:
        batcher = Batcher(run, max_batch=4, max_wait_s=0.05)
        loop_task = asyncio.create_task(batcher.serve())
        while batcher.queue is None:
            await asyncio.sleep(0)
        image = np.full((2, 2, 3), 7, np.uint8)
        gone, failed = asyncio.create_task(batcher.score(image)), asyncio.create_task(batcher.score(image))
        await asyncio.sleep(0.1)  # both queued, in one batch
        gone.cancel()
        with pytest.raises(RuntimeError, match="the runtime failed"):
            await asyncio.wait_for(failed, 10)
        later = await asyncio.wait_for(batcher.score(image), 10)  # a generous bound around the wait
        assert later["score"] == 7.0 and calls == [2, 1]
        loop_task.cancel()
        batcher.executor.shutdown()

    asyncio.run(main())
