"""Stage local_manifest: what `data.local` holds (file sizes and sha256) -> data/local.json.

`data.local` is a folder or archive outside the project, which DVC cannot track by itself. This stage runs on
every `dvc repro` (always_changed; cheap: hashes are cached by path, size and mtime) and rewrites
data/local.json; the download stage depends on that file, so editing the folder or archive in place reruns
download and everything after it, while an unchanged one reruns nothing.
"""

from pathlib import Path

from common import ROOT, Params, run

from ahl.core.io import write_json
from ahl.core.layout import LOCAL as OUT
from ahl.data.download import DataConfig
from ahl.data.local import local_manifest


def main(params: Params) -> None:
    data = params.section("data", DataConfig)
    local = None if data.local is None else Path(data.local).expanduser()
    if local is not None and not local.is_absolute():
        local = ROOT / local
    write_json(ROOT / OUT, local_manifest(local, hash_cache=ROOT / data.downloads / ".hash-cache.json"))


if __name__ == "__main__":
    run(main, __doc__)
