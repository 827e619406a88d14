"""The FastAPI application of `ahl serve` (ahl/deploy/serve.py starts it): scoring, heatmaps, labels, the review
page, health and Prometheus metrics. Every error is one JSON line (or the page with one message) and a 4xx;
nothing a request does shows a stack trace."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ahl.core.errors import UserError
from ahl.deploy.exported import MODEL_FILES, ExportedRun
from ahl.deploy.files import caption
from ahl.deploy.review import page, shown_path
from ahl.deploy.station import Batcher, Labels, Recent, Record, decode, heatmap_png, sha256_of

log = logging.getLogger("ahl.deploy.service")


class Refused(Exception):
    """A request refused with ``status`` and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Station:
    """Everything the service holds: the export, the batcher, the recent results, the labels and the metrics."""

    run: ExportedRun
    labels: Labels | None
    token: str | None
    batch_size: int
    max_wait_s: float
    keep: int
    max_bytes: int
    max_images: int
    max_pixels: int
    threads: int
    hosts: list[str] = field(default_factory=list)  # the Host names allowed (empty: any)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    ready: bool = False

    def __post_init__(self):
        self.recent = Recent(self.keep)
        self.batcher = Batcher(self.run.run, self.batch_size, self.max_wait_s)
        self.requests = Counter("ahl_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.errors = Counter("ahl_request_errors", "requests answered 4xx or 5xx", ["route"], registry=self.registry)
        self.latency = Histogram("ahl_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        self.decisions = Counter("ahl_decisions", "images scored, by decision", ["decision"], registry=self.registry)
        self.batches = Histogram("ahl_batch_images", "images per runtime batch", registry=self.registry,
                                 buckets=(1, 2, 4, 8, 16, 32, 64))  # fmt: skip

    def model(self) -> dict:
        """The exported model: its name, base or ahl, and the sha256 of its model file (model.onnx, model.xml)."""
        meta = self.run.metadata
        return {"name": meta["model_name"], "kind": meta["model"],
                "sha256": meta["files"][MODEL_FILES[meta["format"]][0]]}  # fmt: skip

    def rule(self) -> dict:
        """How the decision is made: the comparison, and how calibrate chose the threshold (and how firm it is)."""
        calibration = self.run.metadata.get("calibration") or {}
        return {"compare": self.run.metadata["decision"], "chosen_by": calibration.get("rule"),
                "target_fpr": calibration.get("target_fpr"), "firmness": calibration.get("firmness")}  # fmt: skip


async def _files(request: Request, station: Station) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request: multipart file fields, or the raw body as one image."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=station.max_images, max_fields=station.max_images + 16)
        except HTTPException as exc:  # Starlette's parser: too many files or fields, a broken body
            if "Too many files" in str(exc.detail):
                raise Refused(413, f"more than {station.max_images} images in one request (--max-images)") from None
            raise Refused(400, f"the multipart body cannot be read: {exc.detail}") from None
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    else:
        files = [("body", await request.body())]
    if not files or not any(data for _, data in files):
        raise Refused(400, "no image in the request: send image files as multipart form data, or one image's bytes")
    if len(files) > station.max_images:
        raise Refused(413, f"{len(files)} images in one request, the limit is {station.max_images} (--max-images)")
    return files


async def score(station: Station, files: list[tuple[str, bytes]]) -> list[Record]:
    """Decode (the content decides), score through the batcher, keep the records."""
    size, run = station.run.size, station.run

    def read(name: str, data: bytes) -> tuple[np.ndarray, str]:
        try:
            return decode(data, name, size, station.max_pixels)
        except UserError as exc:
            raise Refused(415 if "not an image" in str(exc) else 400, str(exc)) from None

    decoded = [await run_in_threadpool(read, name, data) for name, data in files]
    outs = await asyncio.gather(*(station.batcher.score(image) for image, _ in decoded))
    records = []
    for (name, data), (_, suffix), out in zip(files, decoded, outs):
        value = float(out["score"])
        decided, near = run.decide(np.array([value])), run.borderline(np.array([value]))
        records.append(Record(
            id=sha256_of(data), name=name, data=data, suffix=suffix, score=value,
            head_scores={h: float(v) for h, v in zip(run.head_names, out["head_scores"])},
            anomaly_map=np.asarray(out["anomaly_map"]), is_anomaly=None if decided is None else bool(decided[0]),
            borderline=None if near is None else bool(near[0]),
        ))  # fmt: skip
        station.recent.add(records[-1])
        verdict = records[-1].is_anomaly
        station.decisions.labels("undecided" if verdict is None else "anomaly" if verdict else "normal").inc()
    return records


def answer(station: Station, record: Record) -> dict:
    """One image's answer: score, decision, threshold and rule, model, borderline flag, heatmap URL."""
    return {
        "id": record.id, "name": record.name, "sha256": record.sha256, "score": record.score,
        "decision": None if record.is_anomaly is None else ("anomaly" if record.is_anomaly else "normal"),
        "is_anomaly": record.is_anomaly, "borderline": record.borderline, "threshold": station.run.threshold,
        "tolerance": station.run.tolerance, "rule": station.rule(), "model": station.model(),
        "head_scores": record.head_scores, "heatmap": f"/v1/heatmaps/{record.id}.png",
    }  # fmt: skip


def _same_origin(request: Request) -> None:
    """A form or label post from another site's page (a browser sends its Origin) is refused."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise Refused(403, f"a request from {origin} may not label or upload here")


def label(station: Station, request: Request, record_id: str, chosen: str, token: str | None) -> tuple[Record, str]:
    """Write one label (checks: labelling on, the token, a known image); (the record, the path written)."""
    if station.labels is None:
        raise Refused(404, "labelling is off: start ahl serve with --labels FOLDER (the project's data.local)")
    _same_origin(request)
    given = token or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if station.token is not None and not hmac.compare_digest(given.encode(), station.token.encode()):
        raise Refused(403, "labelling needs the token of --token-file (Authorization: Bearer TOKEN)")
    record = station.recent.get(record_id)
    if record is None:
        raise Refused(404, f"no recent image with id {record_id!r}: score it again, then label it")
    try:
        path = station.labels.write(record, chosen.strip())
    except UserError as exc:
        raise Refused(409 if "already labelled" in str(exc) else 400, str(exc)) from None
    return record, shown_path(path, station.labels)


def build_app(station: Station) -> FastAPI:
    """The application over ``station`` (no global state: each app has its own registry and batcher)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(station.batcher.serve())
        while station.batcher.queue is None:
            await asyncio.sleep(0)
        await station.batcher.score(np.zeros((station.run.size, station.run.size, 3), np.uint8))  # warm up
        station.ready = True
        yield
        task.cancel()
        station.batcher.executor.shutdown(wait=False)

    app = FastAPI(title="ahl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if station.hosts:  # on loopback: only its own names, so a rebinding site's name never reaches the page
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=station.hosts)
    _middleware(app, station)
    _errors(app)
    _api_routes(app, station)
    _page_routes(app, station)
    return app


def _middleware(app: FastAPI, station: Station) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        if request.method == "POST":
            length = request.headers.get("content-length")
            if "transfer-encoding" in request.headers:  # a chunked body would escape the Content-Length check
                response = _error(411, "send the body with a Content-Length, not Transfer-Encoding")
            elif length is None or not length.isdigit():
                response = _error(411, "send a Content-Length header with the request")
            elif int(length) > station.max_bytes:
                response = _error(413, f"the request has {int(length):,} bytes, the limit is {station.max_bytes:,} "
                                       "(--max-bytes)")  # fmt: skip
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "other")
        station.requests.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            station.errors.labels(route).inc()
        station.latency.labels(route).observe(time.perf_counter() - start)
        return response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return _error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _error(500, f"the service failed on this request ({type(exc).__name__}); see its log")


def _api_routes(app: FastAPI, station: Station) -> None:
    @app.post("/v1/score")
    async def score_route(request: Request):
        records = await score(station, await _files(request, station))
        return {"results": [answer(station, r) for r in records]}

    @app.get("/v1/heatmaps/{record_id}.png")
    async def heatmap(record_id: str):
        record = station.recent.get(record_id)
        if record is None:
            raise Refused(404, f"no recent image with id {record_id!r} (the service keeps the last {station.keep})")
        text = caption(station.run.model, record.score, station.run.threshold)
        return Response(await run_in_threadpool(heatmap_png, record, text), media_type="image/png")

    @app.post("/v1/labels")
    async def labels_route(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, 'send JSON: {"id": "<id from /v1/score>", "label": "good" or a defect class}') from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(body.get("label"), str):
            raise Refused(400, 'send JSON: {"id": "<id from /v1/score>", "label": "good" or a defect class}')
        record, path = await run_in_threadpool(label, station, request, body["id"], body["label"], None)
        return {"id": record.id, "label": record.label, "file": path}

    @app.get("/v1/metadata")
    async def metadata():
        return station.run.metadata

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return JSONResponse({"ready": station.ready}, status_code=200 if station.ready else 503)

    @app.get("/metrics")
    async def metrics():
        for size in station.batcher.sizes[:]:
            station.batches.observe(size)
        station.batcher.sizes.clear()
        return Response(generate_latest(station.registry), media_type=CONTENT_TYPE_LATEST)


def _page_routes(app: FastAPI, station: Station) -> None:
    def render(message: str = "", ok: bool = False, show: str = "all", sort: str = "recent", status: int = 200):
        html = page(station.recent.all(), metadata=station.run.metadata, threshold=station.run.threshold,
                    labels=station.labels, token_required=station.token is not None, show=show, sort=sort,
                    message=message, ok=ok)  # fmt: skip
        return HTMLResponse(html, status_code=status)

    @app.get("/")
    async def index(show: str = "all", sort: str = "recent", msg: str = ""):
        return render(msg[:400], ok=True, show=show if show in ("all", "flagged", "borderline") else "all",
                      sort=sort if sort in ("recent", "score") else "recent")  # fmt: skip

    @app.post("/review/upload")
    async def upload(request: Request):
        try:
            _same_origin(request)
            records = await score(station, await _files(request, station))
        except Refused as exc:
            return render(str(exc), status=exc.status)
        names = ", ".join(f"{r.name}: {r.score:.4f}" for r in records)
        return RedirectResponse(f"/?msg={quote('scored ' + names[:300])}", status_code=303)

    @app.post("/review/label")
    async def label_form(request: Request):
        form = await request.form(max_files=0, max_fields=8)
        chosen = str(form.get("new_label") or "").strip() or str(form.get("label") or "")
        try:
            record, path = await run_in_threadpool(label, station, request, str(form.get("id", "")), chosen,
                                                   str(form.get("token") or "") or None)  # fmt: skip
        except Refused as exc:
            return render(str(exc), status=exc.status)
        return render(f"labelled {record.name} as {record.label}: {path}", ok=True)
