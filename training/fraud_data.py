"""Reads credit-card transaction CSVs (Kaggle's creditcard.csv, or gzip'd samples of it) into arrays."""

from __future__ import annotations

import csv
import gzip
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.artifacts import sha256_hex
from app.inference.fraud_scorer import INPUT_FIELDS

LABEL_COLUMN = "Class"
_GZIP_MAGIC = b"\x1f\x8b"


class FraudDataError(ValueError):
    """The file cannot be used as training data; the message is one line a person can act on."""


@dataclass(frozen=True)
class Transactions:
    X: np.ndarray  # [rows, 30] float64, columns in INPUT_FIELDS order
    y: np.ndarray  # [rows] int64, 1 = fraud
    path: Path
    sha256: str

    @property
    def frauds(self) -> int:
        return int(self.y.sum())

    @property
    def duplicate_rows(self) -> int:
        """Rows identical (features and label) to an earlier row; Kaggle's file has 1,081 of them."""
        rows = np.column_stack([self.X, self.y])
        return len(rows) - len(np.unique(rows, axis=0))


def load_transactions(path: Path) -> Transactions:
    """Columns are found by name, so extra ones (orig_index, src...) and any order are fine."""
    path = Path(path)
    if path.is_dir():
        raise FraudDataError(f"{path}: is a directory, not a CSV file")
    if not path.is_file():
        raise FraudDataError(f"{path}: no such file")
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
    try:
        with _open_text(path, gzipped) as handle:
            header = next(csv.reader([handle.readline()]), [])
            names = [name.strip().lstrip("\ufeff") for name in header]
            missing = [name for name in (*INPUT_FIELDS, LABEL_COLUMN) if name not in names]
            if missing:
                shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
                raise FraudDataError(
                    f"{path}: not a credit-card CSV: missing column(s) {shown} "
                    f"(expected Time, V1..V28, Amount, Class)"
                )
            columns = [names.index(name) for name in (*INPUT_FIELDS, LABEL_COLUMN)]
            # Kaggle quotes its Class values ("0"); loadtxt's quotechar copes, extra columns are never parsed.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="loadtxt: input contained no data")  # reported below
                table = np.loadtxt(handle, delimiter=",", usecols=columns, quotechar='"', dtype=np.float64, ndmin=2)
    except FraudDataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FraudDataError(f"{path}: unreadable as CSV: {first_line}") from exc

    if len(table) == 0:
        raise FraudDataError(f"{path}: no rows after the header")
    if not np.isfinite(table).all():
        raise FraudDataError(f"{path}: contains NaN or infinite values")
    labels = table[:, -1]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise FraudDataError(f"{path}: Class must be 0 or 1")
    return Transactions(X=table[:, :-1], y=labels.astype(np.int64), path=path, sha256=sha256_hex(path))


def _open_text(path: Path, gzipped: bool) -> io.TextIOBase:
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")
