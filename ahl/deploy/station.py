"""What `ahl serve` keeps (no torch): images decoded from request bytes, the batcher that scores concurrent
requests together, the recent results the review page shows, and the labels written back into an own-data folder
with their audit CSV (docs/deployment.md, "Serving")."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import hashlib
import io
import os
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ahl.core.errors import UserError
from ahl.core.spreadsheet import neutralise
from ahl.data.mvtec import CORRUPT_FIX, GOOD, load_image
from ahl.data.own import MASKS, NORMAL_FOLDERS
from ahl.deploy.infer import resized
from ahl.evaluation.overlay import overlay

AUDIT = "labels.csv"  # in the labels folder, beside the dataset's own folder
AUDIT_COLUMNS = ("time", "sha256", "label", "file", "score", "model", "model_sha256")
# the formats data.local's readers take (ahl/data/mvtec.py IMAGE_SUFFIXES): a label must reach training
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class Record:
    """One scored image: what the API answers and the review page shows (the bytes are kept for labelling)."""

    id: str
    name: str
    data: bytes
    suffix: str
    score: float
    head_scores: dict[str, float]
    anomaly_map: np.ndarray
    is_anomaly: bool | None
    borderline: bool | None
    time: float = field(default_factory=time.time)
    label: str | None = None

    @property
    def sha256(self) -> str:
        return self.id


def decode(data: bytes, name: str, size: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """(RGB uint8 (size, size, 3), the file suffix of its format) of an uploaded file, read as the stages read
    images: the content decides, never the name. Not an image, or above ``max_pixels``: a UserError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        kind = None
    if kind not in SUFFIXES:
        raise UserError(f"{name}: not an image this service reads (PNG, JPEG, BMP, TIFF); send the image file")
    try:
        image = load_image(_Named(data, name), size, max_pixels)
    except UserError as exc:
        raise UserError(str(exc).replace(f"; {CORRUPT_FIX}", "; send the image file")) from None
    return image, SUFFIXES[kind]


class _Named(io.BytesIO):
    """Uploaded bytes that read as their file name in messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.shown = name

    def __str__(self) -> str:
        return self.shown


def heatmap_png(record: Record, caption: str) -> bytes:
    """The record's heatmap drawn over its image at the image's own size, as PNG bytes."""
    with Image.open(io.BytesIO(record.data)) as im:
        image = np.asarray(im.convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(overlay(image, resized(record.anomaly_map)(image.shape[:2]), caption)).save(buf, format="PNG")
    return buf.getvalue()


class Recent:
    """The last ``keep`` records by id (a repeated image replaces its older record), safe across threads."""

    def __init__(self, keep: int):
        self.keep, self._items, self._lock = keep, OrderedDict(), threading.Lock()

    def add(self, record: Record) -> None:
        with self._lock:
            self._items.pop(record.id, None)
            self._items[record.id] = record
            while len(self._items) > self.keep:
                self._items.popitem(last=False)

    def get(self, record_id: str) -> Record | None:
        with self._lock:
            return self._items.get(record_id)

    def all(self) -> list[Record]:
        with self._lock:
            return list(self._items.values())


class Batcher:
    """Scores images of concurrent requests together: a batch closes at ``max_batch`` images or ``max_wait_s``
    after its first, whichever comes first; the runtime runs on one thread of its own (its ops use the cores)."""

    def __init__(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch: int, max_wait_s: float):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ahl-runtime")
        self.queue: asyncio.Queue | None = None
        self.sizes: list[int] = []  # each batch's size (the metrics read them)

    async def serve(self) -> None:
        """The loop that forms and runs batches (a task started with the app)."""
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:  # TimeoutError's alias from Python 3.11, another class on 3.10
                    break
            try:
                out = await loop.run_in_executor(self.executor, self.run, np.stack([image for image, _ in batch]))
            except Exception as exc:  # the runtime's own error types: each waiting request gets it, the loop goes on
                for _, future in batch:
                    if not future.done():  # a request whose client went away is cancelled already
                        future.set_exception(exc)
                continue
            self.sizes.append(len(batch))
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    future.set_result({name: value[i].copy() for name, value in out.items()})

    async def score(self, image: np.ndarray) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future


class Labels:
    """Labels into an own-data folder, as ``data.local`` reads it: ``folder/<classname>/`` in the MVTec layout
    (good -> train/good, a defect -> test/<class>) or, where the dataset already uses it, the folder layout
    (good/ or normal/, <class>/). Files are named by their sha256, written atomically, never over a file; every
    label is a row of ``folder/labels.csv`` (spreadsheet-safe)."""

    def __init__(self, folder: Path, classname: str, model: str, model_sha256: str):
        self.folder, self.root = folder, folder / classname
        self.model, self.model_sha256 = model, model_sha256
        self.audit = folder / AUDIT
        flat = [n for n in NORMAL_FOLDERS if (self.root / n).is_dir()]
        self.mvtec = (self.root / "train").is_dir() or (self.root / "test").is_dir() or not flat
        self.good = self.root / "train" / GOOD if self.mvtec else self.root / flat[0]
        self._lock = threading.Lock()

    def classes(self) -> list[str]:
        """The defect classes the dataset holds now."""
        parent = self.root / "test" if self.mvtec else self.root
        skip = {GOOD, *NORMAL_FOLDERS, MASKS}
        if not parent.is_dir():
            return []
        return sorted(d.name for d in parent.iterdir() if d.is_dir() and d.name not in skip and d.name[0] != ".")

    def folder_of(self, label: str) -> Path:
        """Where an image labelled ``label`` goes: good, or a defect class (an existing one or a new name)."""
        if label == GOOD:
            return self.good
        kinds = {unicodedata.category(c) for c in label}  # control, format, unpaired, private, unassigned; breaks
        odd = "/" in label or "\\" in label or any(k[0] == "C" or k in ("Zl", "Zp") for k in kinds)
        reserved = label in {*NORMAL_FOLDERS, MASKS, "train", "test", ".", ".."} or label.startswith(".")
        too_long = len(label) > 64 or len(label.encode("utf-8", "replace")) > 128  # file systems count bytes
        odd = odd or label != unicodedata.normalize("NFC", label)
        if not label or odd or reserved or label != label.strip() or too_long:
            raise UserError(f"label {label!r} cannot name a defect class folder (empty, a separator, control or "
                            "unpaired character, reserved, hidden, not NFC, or over 64 characters / 128 bytes); choose "
                            "another name")  # fmt: skip
        return (self.root / "test" if self.mvtec else self.root) / label

    def write(self, record: Record, label: str) -> Path:
        """Write ``record``'s image under ``label`` and append the audit row; the path written. An image already
        labelled is left as it is: the same label again returns its file, another label is refused."""
        target = self.folder_of(label) / f"{record.sha256}{record.suffix}"
        with self._lock, open(self.audit, "a", newline="", encoding="utf-8") as audit:
            fcntl.flock(audit, fcntl.LOCK_EX)  # other processes labelling into the same folder wait here
            existing = next(self.root.rglob(f"{record.sha256}.*"), None) if self.root.is_dir() else None
            if existing is not None:
                if existing.parent == target.parent:
                    record.label = label
                    return existing
                raise UserError(f"this image ({record.sha256[:12]}...) is already labelled: {existing}; remove that "
                                "file first to label it again")  # fmt: skip
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(record.data)
            try:
                os.link(tmp, target)  # fails where a file exists: never overwritten
            finally:
                tmp.unlink()
            writer = csv.writer(audit)
            if audit.tell() == 0:
                writer.writerow(AUDIT_COLUMNS)
            writer.writerow([neutralise(time.strftime("%Y-%m-%dT%H:%M:%S%z")), record.sha256, neutralise(label),
                             neutralise(str(target.relative_to(self.folder))), round(record.score, 6),
                             neutralise(self.model), self.model_sha256])  # fmt: skip
            audit.flush()
            os.fsync(audit.fileno())
        record.label = label
        return target


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
