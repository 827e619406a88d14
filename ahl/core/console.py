"""What a person at a terminal sees: log lines and progress bars. Free of torch, so the data stages start fast."""

from __future__ import annotations

import logging
import sys


def show_progress() -> bool:
    """Progress bars only for a person watching a terminal (not in tests, CI logs or pipes)."""
    return sys.stderr.isatty()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
