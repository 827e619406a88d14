"""Downloads (resume, checksums, HTTP errors), safe extraction, ``obtain`` and the dataset registry.

A local HTTP server on 127.0.0.1 stands in for the dataset hosts; it honours Range and can be told to cut a
response midway, to ignore Range, or to answer 404.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import random
import socket
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from ahl.core.errors import UserError
from ahl.data import datasets
from ahl.data import fetch as fetching
from ahl.data.archives import safe_extract
from ahl.data.download import obtain
from ahl.data.fetch import fetch, sha256_file
from ahl.data.registry import Source

PAYLOAD = random.Random(0).randbytes(3 * fetching.CHUNK + 12345)  # several chunks, so a cut lands mid-file
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# ------------------------------------------------------------------------------------------------- local server
class Server:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the connection is dropped (first GET only)
        self.ignore_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.url = ""


def _handler(state: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            state.requests.append((self.path, range_header))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            if range_header and self.path not in state.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            rest = body[start:]
            self.send_header("Content-Length", str(len(rest)))
            self.end_headers()
            cut = state.cut_once.pop(self.path, None)
            if cut is not None:
                self.wfile.write(rest[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(rest)

    return Handler


@pytest.fixture(scope="module")
def _server():
    state = Server()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_server: Server) -> Server:
    _server.files.clear()
    _server.cut_once.clear()
    _server.ignore_range.clear()
    _server.requests.clear()
    return _server


# ---------------------------------------------------------------------------------------------------- fetch
def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_file(path) == PAYLOAD_SHA


def test_fetch_good_file(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "dl" / "data.bin"
    assert fetch(f"{server.url}/data.bin", dest, sha256=PAYLOAD_SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("data.bin.part").exists()


def test_fetch_without_pinned_hash_warns_with_the_hash(server: Server, tmp_path: Path, caplog) -> None:
    server.files["/data.bin"] = PAYLOAD
    with caplog.at_level(logging.WARNING, logger="ahl.data.fetch"):
        fetch(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=None, progress=False)
    assert PAYLOAD_SHA in caplog.text


def test_fetch_wrong_checksum(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    url = f"{server.url}/data.bin"
    with pytest.raises(UserError) as err:
        fetch(url, dest, sha256="0" * 64, progress=False)
    message = str(err.value)
    assert url in message and "0" * 64 in message and PAYLOAD_SHA in message
    assert "mirror" in message and str(dest.resolve()) in message
    assert not dest.exists()
    assert not dest.with_name("data.bin.part").exists()


def test_fetch_resumes_after_a_cut(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    cut = fetching.CHUNK + 777
    server.cut_once["/data.bin"] = cut
    dest = tmp_path / "data.bin"
    part = dest.with_name("data.bin.part")
    url = f"{server.url}/data.bin"
    with pytest.raises(UserError, match="interrupted") as err:
        fetch(url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert url in str(err.value)
    assert not dest.exists()
    assert 0 < part.stat().st_size <= cut

    offset = part.stat().st_size
    fetch(url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.requests[-1] == ("/data.bin", f"bytes={offset}-")
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_fetch_restarts_when_the_server_ignores_range(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    server.ignore_range.add("/data.bin")
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD[:1000])
    fetch(f"{server.url}/data.bin", dest, sha256=PAYLOAD_SHA, progress=False)
    assert server.requests[-1][1] == "bytes=1000-"
    assert dest.read_bytes() == PAYLOAD


def test_fetch_part_already_complete_416(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(PAYLOAD)
    fetch(f"{server.url}/data.bin", dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]


def test_fetch_404(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/missing.bin"
    with pytest.raises(UserError) as err:
        fetch(url, tmp_path / "missing.bin", sha256=None, progress=False)
    assert "404" in str(err.value) and url in str(err.value) and "mirror" in str(err.value)
    assert not (tmp_path / "missing.bin").exists()


def test_fetch_unreachable(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    dest = tmp_path / "x.zip"
    with pytest.raises(UserError) as err:
        fetch(url, dest, sha256=None, progress=False, timeout=5)
    assert url in str(err.value) and str(dest.resolve()) in str(err.value) and "by hand" in str(err.value)


def test_existing_dest_is_verified_on_every_use(server: Server, tmp_path: Path) -> None:
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    url = f"{server.url}/data.bin"
    fetch(url, dest, sha256=PAYLOAD_SHA, progress=False)
    fetch(url, dest, sha256=PAYLOAD_SHA, progress=False)  # present and good: no new request
    assert len(server.requests) == 1

    edited = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF])  # same size, last byte changed (never equal to it)
    dest.write_bytes(edited)
    with pytest.raises(UserError, match="does not match") as err:
        fetch(url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert str(dest) in str(err.value)
    assert len(server.requests) == 1  # a user's file is never downloaded over
    assert dest.read_bytes() == edited


# ----------------------------------------------------------------------------------------------- archives
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@pytest.mark.parametrize(
    "members, culprit",
    [
        ([_file("ok.txt"), _file("../evil.txt")], "../evil.txt"),
        ([_file("ok.txt"), _file("a/../../evil.txt")], "a/../../evil.txt"),
        ([_file("/tmp/ahl-evil-abs.txt")], "/tmp/ahl-evil-abs.txt"),
        ([_file("ok.txt"), _link("link", "../../etc/passwd")], "link"),
        ([_link("abs-link", "/etc/passwd")], "abs-link"),
        ([_file("ok.txt"), _link("hard", "../outside.txt", tarfile.LNKTYPE)], "hard"),
        ([_link("d", "."), _file("d/../evil.txt")], "d/../evil.txt"),
        ([_file("z/keep.txt"), _link("z/x", "../y/.."), _link("y", ".")], "z/x"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-out",
        "symlink-absolute",
        "hardlink-out",
        "through-symlink",
        "symlink-chain",
    ],
)
def test_tar_refuses_escaping_members(tmp_path: Path, members, culprit: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", members)
    target = tmp_path / "out" / "target"
    with pytest.raises(UserError) as err:
        safe_extract(archive, target)
    assert str(archive) in str(err.value) and repr(culprit) in str(err.value)
    assert not target.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()
    assert not Path("/tmp/ahl-evil-abs.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left either


def test_tar_refuses_devices_and_fifos(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    archive = _tar(tmp_path / "fifo.tar", [(fifo, None)])
    with pytest.raises(UserError, match="device or fifo"):
        safe_extract(archive, tmp_path / "target")
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize(
    "members, symlinks, culprit",
    [
        ([("ok.txt", b"x"), ("../evil.txt", b"x")], None, "../evil.txt"),
        ([("/abs-evil.txt", b"x")], None, "/abs-evil.txt"),
        ([("ok.txt", b"x")], {"link": "../../etc/passwd"}, "link"),
        ([("z/keep.txt", b"x")], {"z/x": "../y/..", "y": "."}, "z/x"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-chain"],
)
def test_zip_refuses_escaping_members(tmp_path: Path, members, symlinks, culprit: str) -> None:
    archive = _zip(tmp_path / "bad.zip", members, symlinks)
    target = tmp_path / "out" / "target"
    with pytest.raises(UserError) as err:
        safe_extract(archive, target)
    assert str(archive) in str(err.value) and repr(culprit) in str(err.value)
    assert not target.exists() and not (tmp_path / "evil.txt").exists()


def test_good_tar_gz_extracts(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "good.tar.gz",
        [_file("top/a.txt", b"alpha"), _file("top/sub/b.txt", b"beta"), _link("top/sub/link", "../a.txt")],
    )
    target = tmp_path / "target"
    target.mkdir()
    (target / "stale.txt").write_text("old")  # the target is replaced as a whole
    safe_extract(archive, target)
    assert (target / "top/a.txt").read_bytes() == b"alpha"
    assert (target / "top/sub/b.txt").read_bytes() == b"beta"
    assert (target / "top/sub/link").is_symlink() and (target / "top/sub/link").read_bytes() == b"alpha"
    assert not (target / "stale.txt").exists()


def test_good_zip_extracts(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "good.zip", [("top/a.txt", b"alpha"), ("top/sub/b.txt", b"beta")], {"top/l": "a.txt"})
    safe_extract(archive, tmp_path / "target")
    assert (tmp_path / "target/top/a.txt").read_bytes() == b"alpha"
    assert (tmp_path / "target/top/sub/b.txt").read_bytes() == b"beta"
    assert (tmp_path / "target/top/l").read_bytes() == b"alpha"


def test_members_under_extracts_one_folder(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "all.tar", [_file("./carpet/train/good/000.png"), _file("bottle/x.png"), _file("r.txt")])
    safe_extract(archive, tmp_path / "t", members_under="carpet/")
    assert sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*.png")) == [
        "carpet/train/good/000.png"
    ]
    with pytest.raises(UserError, match="holds nothing under"):
        safe_extract(archive, tmp_path / "u", members_under="grid/")
    assert not (tmp_path / "u").exists()


def test_damaged_archive_is_a_user_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match="damaged"):
        safe_extract(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------------------------------ obtain
def _source_of(classname: str) -> Source:
    selection = datasets.resolve(classname)
    return datasets.get_source(datasets.get_dataset(selection.dataset), selection.source)


def test_obtain_manual_missing_names_the_absolute_path(tmp_path: Path) -> None:
    source = _source_of("headct")
    downloads = tmp_path / "downloads"
    with pytest.raises(UserError) as err:
        obtain(source, tmp_path / "raw", downloads=downloads, progress=False)
    message = str(err.value)
    assert str((downloads / "head-ct-hemorrhage.zip").resolve()) in message
    assert "kaggle" in message.lower()
    assert not (tmp_path / "raw").exists()


def test_obtain_manual_archive_is_verified_and_extracted(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    members = [("wrap/labels.csv", b"id,hemorrhage\n"), ("wrap/head_ct/head_ct/000.png", b"p")]
    archive = _zip(downloads / "h.zip", members)
    sha = sha256_file(archive)
    source = Source(key="headct", filename="h.zip", manual=True, sha256=sha, instructions="-", marker="labels.csv")
    obtain(source, tmp_path / "raw", downloads=downloads, progress=False)
    assert (tmp_path / "raw/labels.csv").exists()  # re-rooted onto the folder holding the marker
    assert (tmp_path / "raw/head_ct/head_ct/000.png").exists()

    bad = Source(key="headct", filename="h.zip", manual=True, sha256="1" * 64, instructions="-", marker="labels.csv")
    with pytest.raises(UserError, match="does not match"):
        obtain(bad, tmp_path / "raw2", downloads=downloads, progress=False)
    assert not (tmp_path / "raw2").exists()


def test_obtain_elpv_from_the_installed_package(tmp_path: Path) -> None:
    pytest.importorskip("elpv_dataset")
    source = _source_of("elpv")
    assert source.package == "elpv-dataset"
    raw = tmp_path / "raw" / "elpv"
    obtain(source, raw, downloads=tmp_path / "downloads", progress=False)  # no server: must not touch the network
    assert (raw / "labels.csv").is_file()
    assert len(list((raw / "images").glob("*.png"))) == 2624
    assert not (tmp_path / "downloads").exists()


def test_obtain_downloads_and_reroots(server: Server, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("elpv-dataset-master/src/elpv_dataset/data/labels.csv", "images/cell0001.png 1.0 mono\n")
        zf.writestr("elpv-dataset-master/src/elpv_dataset/data/images/cell0001.png", b"png")
        zf.writestr("elpv-dataset-master/README.md", "readme")
    server.files["/elpv.zip"] = buffer.getvalue()
    source = Source(key="elpv", url=f"{server.url}/elpv.zip", filename="elpv.zip", marker="labels.csv")  # no package
    downloads = tmp_path / "downloads"
    obtain(source, tmp_path / "raw", downloads=downloads, progress=False)
    assert (tmp_path / "raw/labels.csv").is_file() and (tmp_path / "raw/images/cell0001.png").is_file()
    assert (downloads / "elpv.zip").is_file()

    # A mirror replaces the URL; a mirror ending in "/" gets the file name appended.
    server.files["/mirror/elpv.zip"] = buffer.getvalue()
    (downloads / "elpv.zip").unlink()
    obtain(source, tmp_path / "raw", downloads=downloads, mirror=f"{server.url}/mirror/", progress=False)
    assert server.requests[-1][0] == "/mirror/elpv.zip"


def test_obtain_download_error_adds_instructions(server: Server, tmp_path: Path) -> None:
    source = Source(key="x", url=f"{server.url}/gone.zip", instructions="Ask the authors.")
    with pytest.raises(UserError, match="404.*Ask the authors"):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", progress=False)


def test_obtain_local_full_mvtec_archive_extracts_one_category(tmp_path: Path, caplog) -> None:
    archive = _tar(
        tmp_path / "my-mvtec.tar.gz",
        [_file("carpet/train/good/000.png"), _file("carpet/test/hole/000.png"), _file("bottle/train/good/000.png")],
    )
    source = _source_of("carpet")
    with caplog.at_level(logging.INFO, logger="ahl.data.download"):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", local=archive, progress=False)
    assert (tmp_path / "raw/carpet/train/good/000.png").exists()
    assert not (tmp_path / "raw/bottle").exists()
    assert sha256_file(archive) in caplog.text  # your own archive: its hash is logged, as data/local.json has it
    assert "datasets.py" not in caplog.text


def test_obtain_local_known_archive_with_wrong_hash(tmp_path: Path) -> None:
    fake = _tar(tmp_path / datasets.MVTEC_FULL_ARCHIVE, [_file("carpet/train/good/000.png")])
    source = _source_of("carpet")
    with pytest.raises(UserError, match=datasets.MVTEC_FULL_ARCHIVE_SHA256):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", local=fake, progress=False)
    assert not (tmp_path / "raw").exists()


def test_obtain_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "labels.csv").write_text("x")
    (folder / "images/a.png").write_bytes(b"a")
    source = _source_of("elpv")
    obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", local=folder, progress=False)
    assert (tmp_path / "raw/images/a.png").read_bytes() == b"a"
    with pytest.raises(UserError, match="does not exist"):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", local=tmp_path / "nope", progress=False)


# ---------------------------------------------------------------------------------------------------- registry
def test_every_registered_dataset_resolves() -> None:
    names = datasets.known_classnames()
    for expected in ("carpet", "AITEX", "SDD", "elpv", "optical", "mastcam", "brainmri", "headct", "hyperkvasir"):
        assert expected in names
    for dataset in datasets.DATASETS.values():
        assert dataset.licence and dataset.homepage and dataset.raw_layout and dataset.title
        for subset in dataset.subsets:
            selection = datasets.resolve(subset)
            assert selection.dataset == dataset.name and selection.classname == subset
            assert datasets.get_dataset(selection.dataset) is dataset
            if dataset.build is not None:  # generated locally (the embedded demo)
                continue
            assert datasets.get_source(dataset, selection.source).key == selection.source


def test_unknown_classname_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as err:
        datasets.resolve("no-such-subset")
    assert "no-such-subset" in str(err.value)
    for name in ("carpet", "elpv", "hyperkvasir"):
        assert name in str(err.value)


def test_mvtec_categories_have_their_own_sources_and_elpv_shares_one() -> None:
    assert datasets.resolve("carpet").source == "mvtec-carpet"
    assert datasets.resolve("zipper").source == "mvtec-zipper"
    assert datasets.resolve("carpet").dataset == "mvtec"
    mvtec = datasets.DATASETS["mvtec"]
    assert len(mvtec.subsets) == 15 and len({s.key for s in mvtec.sources.values()}) == 15
    assert _source_of("pill").url.endswith("/pill.tar.xz")
    assert _source_of("pill").members_under == "pill/"
    assert datasets.resolve("elpv").source == "elpv"
    assert datasets.DATASETS["elpv"].sources["elpv"].key == "elpv"
