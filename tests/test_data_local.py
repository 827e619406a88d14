"""``data.local`` as a folder: symlinks never lead out of it, and ``local_manifest`` tracks what it holds."""

from __future__ import annotations

import json
import os
import time
import types
from pathlib import Path

import pytest

from ahl.core.errors import UserError
from ahl.data import local as local_data
from ahl.data.download import obtain
from ahl.data.local import local_manifest
from ahl.data.registry import Source

SOURCE = Source(key="toy", url="https://example.org/toy.zip", marker="labels.csv")
OLD = time.time() - 3600  # an mtime well before the hash cache's racy window


def _folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("images/a.png 0.0 mono\n")
    (root / "images" / "a.png").write_bytes(b"a" * 10)
    (root / "images" / "b.png").write_bytes(b"b" * 20)
    return root


def _age(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        os.utime(p, (OLD, OLD), follow_symlinks=False)


# ------------------------------------------------------------------------------------------ symlinks (obtain)
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_symlink_out_of_the_local_folder_is_refused(tmp_path: Path, kind: str) -> None:
    local = _folder(tmp_path / "mine")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    target = outside / "secret.png" if kind == "file" else outside
    (local / "images" / "link").symlink_to(target)
    raw = tmp_path / "data" / "raw"
    with pytest.raises(UserError) as err:
        obtain(SOURCE, raw, downloads=tmp_path / "downloads", local=local, progress=False)
    message = str(err.value)
    assert str(local / "images" / "link") in message and str(target) in message and "copy" in message
    assert "\n" not in message
    assert not raw.exists() and not [p for p in raw.parent.iterdir()]  # nothing written, no temporary left
    assert (outside / "secret.png").stat().st_nlink == 1  # never hard-linked towards the DVC cache


def test_a_relative_symlink_that_climbs_out_is_refused(tmp_path: Path) -> None:
    local = _folder(tmp_path / "mine")
    (tmp_path / "other.png").write_bytes(b"o")
    (local / "images" / "up.png").symlink_to(Path("..") / ".." / "other.png")
    with pytest.raises(UserError, match="up.png"):
        obtain(SOURCE, tmp_path / "raw", downloads=tmp_path / "downloads", local=local, progress=False)


def test_symlinks_inside_the_local_folder_are_followed(tmp_path: Path) -> None:
    local = _folder(tmp_path / "mine")
    (local / "images" / "c.png").symlink_to("a.png")
    (local / "again").symlink_to("images", target_is_directory=True)
    raw = tmp_path / "raw"
    obtain(SOURCE, raw, downloads=tmp_path / "downloads", local=local, progress=False)
    for rel in ("images/c.png", "again/a.png", "again/b.png"):
        assert not (raw / rel).is_symlink() and (raw / rel).is_file(), rel
    assert (raw / "images" / "c.png").read_bytes() == b"a" * 10


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    local = _folder(tmp_path / "mine")
    (local / "images" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(UserError, match="loop"):
        obtain(SOURCE, tmp_path / "raw", downloads=tmp_path / "downloads", local=local, progress=False)


def test_a_placed_folder_in_downloads_is_checked_too(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    placed = _folder(downloads / "toy")
    (tmp_path / "secret.png").write_bytes(b"s")
    (placed / "images" / "s.png").symlink_to(tmp_path / "secret.png")
    manual = Source(key="toy", filename="toy", manual=True, instructions="-", marker="labels.csv")
    with pytest.raises(UserError, match="s.png"):
        obtain(manual, tmp_path / "raw", downloads=downloads, progress=False)


# ------------------------------------------------------------------------------------------------- manifest
def test_manifest_of_a_folder_lists_every_file_sorted(tmp_path: Path) -> None:
    local = _folder(tmp_path / "mine")
    manifest = local_manifest(local)
    assert manifest["kind"] == "folder"
    assert [f["path"] for f in manifest["files"]] == ["images/a.png", "images/b.png", "labels.csv"]
    assert manifest["files"][0] == {
        "path": "images/a.png",
        "size": 10,
        "sha256": local_data.sha256_file(local / "images" / "a.png"),
    }
    json.dumps(manifest)  # what the stage writes


def test_manifest_is_deterministic_and_independent_of_where_the_folder_is(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a")
    b = _folder(tmp_path / "b" / "deeper")
    cache = tmp_path / "downloads" / ".hash-cache.json"
    assert local_manifest(a, hash_cache=cache) == local_manifest(a, hash_cache=cache) == local_manifest(b)


@pytest.mark.parametrize("edit", ["same-size", "longer", "new-file", "removed", "renamed"])
def test_editing_the_folder_changes_the_manifest(tmp_path: Path, edit: str) -> None:
    local = _folder(tmp_path / "mine")
    _age(local)
    cache = tmp_path / "downloads" / ".hash-cache.json"
    before = local_manifest(local, hash_cache=cache)
    image = local / "images" / "a.png"
    if edit == "same-size":
        image.write_bytes(b"A" * 10)
    elif edit == "longer":
        image.write_bytes(b"a" * 11)
    elif edit == "new-file":
        (local / "images" / "z.png").write_bytes(b"z")
    elif edit == "removed":
        image.unlink()
    else:
        image.rename(local / "images" / "a2.png")
    assert local_manifest(local, hash_cache=cache) != before


def _later(monkeypatch) -> None:
    """The hash cache's clock well past the racy window of files written (or utime'd: ctime) just now."""
    later = time.time_ns() + 10 * local_data.RACY_NS
    monkeypatch.setattr(local_data, "time", types.SimpleNamespace(time_ns=lambda: later))


def test_an_edit_in_place_with_size_and_mtime_restored_is_seen(tmp_path: Path, monkeypatch) -> None:
    """Was: the hash cache was keyed by size and mtime only, so `touch -d`, `rsync -t` or `cp -p` over an edit
    left the manifest (and so the pipeline) unchanged; the kernel's ctime moves on every write."""
    local = _folder(tmp_path / "mine")
    _age(local)
    cache = tmp_path / "downloads" / ".hash-cache.json"
    image = local / "images" / "a.png"
    kept = image.stat()
    _later(monkeypatch)
    before = local_manifest(local, hash_cache=cache)
    image.write_bytes(b"A" * kept.st_size)  # same size, other content
    os.utime(image, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # and its mtime put back
    assert image.stat().st_size == kept.st_size and image.stat().st_mtime_ns == kept.st_mtime_ns
    assert local_manifest(local, hash_cache=cache) != before


def test_an_unchanged_tree_is_served_from_the_hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = _folder(tmp_path / "mine")
    _age(local)
    cache = tmp_path / "downloads" / ".hash-cache.json"
    _later(monkeypatch)
    calls: list[str] = []
    real_sha256 = local_data.sha256_file
    monkeypatch.setattr(local_data, "sha256_file", lambda path, **kw: calls.append(str(path)) or real_sha256(path))
    first = local_manifest(local, hash_cache=cache)
    assert len(calls) == 3 and cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # written atomically: no temporary left
    calls.clear()
    assert local_manifest(local, hash_cache=cache) == first
    assert calls == []  # nothing read again
    (local / "images" / "b.png").write_bytes(b"B" * 20)  # one file edited: only it is hashed again
    local_manifest(local, hash_cache=cache)
    assert calls == [os.path.realpath(local / "images" / "b.png")]


def test_files_modified_just_now_are_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit within the mtime's granularity could leave size and mtime unchanged: such files are hashed again."""
    local = _folder(tmp_path / "mine")
    cache = tmp_path / ".hash-cache.json"
    local_manifest(local, hash_cache=cache)
    _later(monkeypatch)
    calls: list[str] = []
    real_sha256 = local_data.sha256_file
    monkeypatch.setattr(local_data, "sha256_file", lambda path, **kw: calls.append(str(path)) or real_sha256(path))
    local_manifest(local, hash_cache=cache)
    assert len(calls) == 3


def test_a_damaged_hash_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    local = _folder(tmp_path / "mine")
    cache = tmp_path / ".hash-cache.json"
    cache.write_text("{not json")
    assert local_manifest(local, hash_cache=cache) == local_manifest(local)
    assert "hash cache" in caplog.text


def test_manifest_of_an_archive(tmp_path: Path) -> None:
    archive = tmp_path / "mvtec_anomaly_detection.tar.xz"
    archive.write_bytes(b"x" * 100)
    assert local_manifest(archive) == {
        "kind": "file",
        "name": "mvtec_anomaly_detection.tar.xz",
        "size": 100,
        "sha256": local_data.sha256_file(archive),
    }
    assert local_manifest(None) == {"kind": "none"}
    with pytest.raises(UserError, match="does not exist"):
        local_manifest(tmp_path / "nope")


def test_manifest_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    local = _folder(tmp_path / "mine")
    (tmp_path / "secret.png").write_bytes(b"s")
    (local / "images" / "s.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UserError, match="outside"):
        local_manifest(local)


@pytest.mark.parametrize("name", ["labels.csv", "notes.txt", "image.png"])
def test_a_regular_file_that_is_not_an_archive_is_refused_before_anything_is_copied(tmp_path: Path, name: str) -> None:
    local = tmp_path / name
    local.write_text("not a dataset\n")
    with pytest.raises(UserError, match=r"is a file but not a \.zip or \.tar.*archive.*folder") as manifest_error:
        local_manifest(local)
    raw = tmp_path / "raw"
    with pytest.raises(UserError, match="is a file but not a"):
        obtain(SOURCE, raw, downloads=tmp_path / "downloads", local=local, progress=False)
    assert not raw.exists() and not list(tmp_path.glob(".raw.*")), "nothing is copied into the raw folder"
    assert str(local) in str(manifest_error.value)


def test_an_archive_of_yours_without_a_pinned_hash_gets_no_advice_to_edit_the_library(tmp_path, caplog):
    import zipfile

    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("labels.csv", "images/a.png 0.0 mono\n")
        z.writestr("images/a.png", b"a" * 10)
    source = SOURCE  # no sha256 pinned
    with caplog.at_level("INFO"):
        obtain(source, tmp_path / "raw", downloads=tmp_path / "downloads", local=archive, progress=False)
    assert (tmp_path / "raw" / "labels.csv").is_file()
    assert "datasets.py" not in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "data/local.json records it" in caplog.text
