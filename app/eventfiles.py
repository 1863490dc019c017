"""Event files in every format replay reads: JSONL, gzip-compressed JSONL, CSV and Parquet, record by record."""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from models.errors import RiskwatchError

Record = tuple[int, bytes | dict[str, Any]]  # (line, or row for Parquet; the raw line or the row)
# What a damaged or mislabelled file raises while it is being read.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)


class InputFileError(RiskwatchError):
    """An input file that is missing, unreadable or not in a supported format."""


def _open_binary(path: Path) -> IO[bytes]:
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}; check the path and permissions") from None
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".csv", ".tsv"):
        return "csv"
    return "jsonl"


def _jsonl(path: Path) -> Iterator[Record]:
    with _open_binary(path) as f:
        for n, line in enumerate(f, 1):
            if not line.isspace():  # as `line.strip()` is empty, without copying the line
                yield n, line


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    # Table formats have a cell for every column: an empty or null cell is an absent optional field.
    # A label written "1", 1.0 or true is read by the contract itself (models.schemas).
    return {k: v for k, v in row.items() if v is not None and v != "" and k is not None}


def _csv(path: Path) -> Iterator[Record]:
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
        dialect = "excel-tab" if ".tsv" in [s.lower() for s in path.suffixes] else "excel"
        reader = csv.DictReader(f, dialect=dialect)
        for row in reader:
            yield reader.line_num, _clean(row)


def _parquet(path: Path) -> Iterator[Record]:
    try:  # pyarrow is in the `report` extra: the worker image reads no files
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputFileError(
            f"reading {path} as Parquet needs pyarrow: pip install 'riskwatch[report]', or give JSONL or CSV"
        ) from None

    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            for row in batch.to_pylist():
                n += 1
                yield n, _clean(row)
    except (OSError, pa.ArrowException) as exc:
        raise InputFileError(f"cannot read {path} as Parquet after {n} rows: {exc}; check the file") from None


def records(path: Path) -> Iterator[Record]:
    """(line or row number, raw line or row) of a JSONL, JSONL.gz, CSV(.gz) or Parquet file."""
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise InputFileError(f"input {path} {what}; give a JSONL, .jsonl.gz, CSV or Parquet file of events")
    return {"parquet": _parquet, "csv": _csv}.get(_kind(path), _jsonl)(path)


__all__ = ["READ_ERRORS", "InputFileError", "Record", "records"]
