"""`ahl serve`: an export (`ahl export`) as an HTTP service with a review page; no torch, timm or dvc.

    ahl serve --export deploy/                          # http://127.0.0.1:8000/ (the review page)
    ahl serve --export deploy/ --labels data/own        # labels go into data/own/<classname>/ (data.local)
    ahl serve --export deploy/ --host 0.0.0.0 --labels data/own --token-file token.txt

API: POST /v1/score (multipart files, or one image's raw bytes), GET /v1/heatmaps/<id>.png, POST /v1/labels,
GET /v1/metadata, /healthz, /readyz, /metrics (Prometheus). docs/deployment.md, "Serving".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import sys
from pathlib import Path

from ahl import __version__
from ahl.core.console import setup_logging
from ahl.core.errors import UserError
from ahl.data.mvtec import MAX_PIXELS
from ahl.deploy.exported import MODEL_FILES, load_exported
from ahl.deploy.service import Station, build_app
from ahl.deploy.station import Labels

log = logging.getLogger("ahl.deploy.serve")


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | None, host: str, labelling: bool) -> str | None:
    """The labelling token of ``--token-file``; required where labels are on and the host is not loopback."""
    if path is None:
        if labelling and not loopback(host):
            raise UserError(f"--host {host} is not loopback: labelling needs --token-file FILE (a secret of 16+ "
                            "characters), or leave --labels out")  # fmt: skip
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UserError(f"--token-file {path}: {exc.strerror}; give a readable file holding the token") from None
    if len(token) < 16:
        raise UserError(f"--token-file {path}: the token must have at least 16 characters; write a longer one")
    return token


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahl serve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--export", default="deploy", help="the folder `ahl export` wrote (default: deploy)")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the port (default: 8000)")
    p.add_argument("--labels", metavar="FOLDER", help="label into FOLDER/<classname>/ (the project's data.local)")
    p.add_argument("--token-file", help="a file holding the token that labelling needs (required off loopback)")
    p.add_argument("--device", default="cpu", help="cpu (default); cuda (onnxruntime-gpu); an OpenVINO device")
    p.add_argument("--threads", type=int, help="the runtime's threads (default: the cores this process may use)")
    p.add_argument("--batch-size", type=int, default=16, help="most images scored together (default: 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more (default: 5)")
    p.add_argument("--keep", type=int, default=500, help="recent results kept for the page and heatmaps (default: 500)")
    p.add_argument("--max-bytes", type=int, default=32 * 2**20, help="largest request body (default: 32 MiB)")
    p.add_argument("--max-images", type=int, default=64, help="most images in one request (default: 64)")
    p.add_argument("--max-pixels", type=int, help=f"largest image (default: the export's, else {MAX_PIXELS:,})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def station(args: argparse.Namespace) -> Station:
    """The checked arguments as the service's state: the export on its runtime, the labels folder, the token."""
    for name in ("batch_size", "keep", "max_bytes", "max_images", "threads", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.max_wait_ms <= 1000:
        raise UserError(f"--max-wait-ms must lie in 0..1000, got {args.max_wait_ms}")
    token = read_token(args.token_file, args.host, args.labels is not None)
    threads = args.threads or len(os.sched_getaffinity(0))
    run = load_exported(args.export, args.device, threads)
    labels = None
    if args.labels is not None:
        folder, classname = Path(args.labels), run.metadata.get("classname")
        if not folder.is_dir():
            raise UserError(f"--labels {folder}: no such folder; give the folder data.local names (it holds NAME/)")
        if not classname:
            raise UserError(f"{run.folder}/metadata.json names no classname (an older export): export it again")
        model_file = MODEL_FILES[run.metadata["format"]][0]
        labels = Labels(folder.resolve(), classname, run.metadata["model_name"], run.metadata["files"][model_file])
    max_pixels = args.max_pixels or int(run.metadata.get("max_pixels") or MAX_PIXELS)
    hosts = ["127.0.0.1", "localhost", "[::1]", "::1", args.host] if loopback(args.host) else []
    return Station(run, labels=labels, token=token, batch_size=args.batch_size, max_wait_s=args.max_wait_ms / 1000,
                   keep=args.keep, max_bytes=args.max_bytes, max_images=args.max_images, max_pixels=max_pixels,
                   threads=threads, hosts=hosts)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        state = station(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    import uvicorn

    print(f"serving {state.run.metadata['model_name']} ({state.run.folder}) on http://{args.host}:{args.port}/ "
          f"with {state.threads} runtime thread(s)" + (f"; labels into {state.labels.root}" if state.labels else ""),
          flush=True)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="info" if args.verbose else "warning")


if __name__ == "__main__":
    main()
