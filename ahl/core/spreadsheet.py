"""CSV files that are safe to open in a spreadsheet program.

Our CSVs carry names taken from users' files and folders (image paths, defect classes, error messages). A cell
that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a formula by Excel, LibreOffice
and Google Sheets (CSV injection), so such a text cell is written with a leading ``'``, which these programs show
as text, as OWASP recommends. Numeric columns are written as they are.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from ahl.core.io import atomic_path

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula, prefixed with ``'``; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _text(column: pd.Series) -> bool:
    return column.dtype == object or pd.api.types.is_string_dtype(column)


def safe_cells(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell of its text columns neutralised (numbers, booleans and NA untouched)."""
    out = table.copy()
    for column in out.columns:
        if _text(out[column]):
            out[column] = out[column].map(neutralise)
    return out


def write_csv(path: str | Path, table: pd.DataFrame, **to_csv) -> None:
    """``table`` as a spreadsheet-safe CSV at ``path``, written atomically (``to_csv``: pandas' options). A text
    cell holding a carriage return is quoted (with every other text cell), so no reader splits its row."""
    safe = safe_cells(table)
    text = [safe[c] for c in safe.columns if _text(safe[c])]
    if any(s.map(lambda v: isinstance(v, str) and "\r" in v).any() for s in text):
        to_csv.setdefault("quoting", csv.QUOTE_NONNUMERIC)
    with atomic_path(path) as tmp:
        safe.to_csv(tmp, index=False, **to_csv)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV that write_csv wrote, with the ``'`` it put before formula-like text cells taken off again."""
    table = pd.read_csv(path)
    for column in table.columns:
        if _text(table[column]):
            table[column] = table[column].map(
                lambda v: v[1:] if isinstance(v, str) and v[:1] == "'" and v[1:].startswith(FORMULA_STARTS) else v
            )
    return table.copy()  # one block again after the column assignments
