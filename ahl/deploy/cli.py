"""The `ahl` command (a console script, pyproject.toml): `ahl predict ...` scores new images (ahl/deploy/predict.py),
`ahl export ...` writes a run as an ONNX or OpenVINO model (ahl/deploy/export.py), `ahl infer ...` scores images
with it without torch (ahl/deploy/infer.py), `ahl serve ...` serves it over HTTP (ahl/deploy/serve.py). Each command's module is imported when it runs."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "predict": ("ahl.deploy.predict", "score images with a trained run -> predictions.csv (+ heatmaps)"),
    "export": ("ahl.deploy.export", "a trained run -> deploy/: model.onnx or OpenVINO's model.xml, metadata.json"),
    "infer": ("ahl.deploy.infer", "score images with an export, without torch -> predictions.csv (+ heatmaps)"),
    "serve": ("ahl.deploy.serve", "an export as an HTTP service with a review page and labelling, without torch"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        from ahl import __version__

        print(f"ahl {__version__}")
        return
    if not argv or argv[0] not in COMMANDS:
        usage = "usage: ahl COMMAND [-h] [-v] ...  (ahl --version: the version)\ncommands:\n" + "".join(
            f"  {k:10s}{h}\n" for k, (_, h) in COMMANDS.items()
        )
        print(usage, file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout, end="")
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
