"""Records as Arrow tables, and ``--output DIR/*.parquet``: a folder of Parquet part files.

Parquet suits outputs of millions of records that are read back by data tools (Spark, DuckDB, pandas,
Ray) rather than by people. It needs pyarrow, which comes with the ``ray`` extra
(``pip install "captioner[ray]"``); the JSONL and CSV outputs do not.

Part files and resuming
    Records are collected and written as one part file per ``rows_per_part`` records (or per
    ``seconds_per_part`` seconds, whichever comes first, and at the end of the run). A part is written
    beside its final name and renamed into place, so a part file is always complete: a killed run
    loses at most the records not yet in a part. A later run with the same folder reads the ``path``
    and ``error_code`` columns of every part, skips images that have a caption record and retries those
    with an error record, whose rows are removed first (their part is rewritten without them, again by
    renaming). So once a run finishes, the folder holds exactly one record per input image, as the
    JSONL and CSV outputs do. A folder holding a Parquet file that is not a captioner part is never
    modified: the run stops with an error.
"""

from __future__ import annotations

import fcntl
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioner.batch import InputError, Record, _Entry, _one_record_per_path, write_file_atomically

PARQUET_PATTERN = "*.parquet"
RAY_EXTRA = 'pip install "captioner[ray]"'
_PART_PREFIX = "part-"
_LOCK_NAME = ".captioner.lock"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule must be loaded for pyarrow.parquet below
    except ImportError:
        raise InputError(f"Parquet output needs pyarrow: {RAY_EXTRA}") from None
    return pyarrow


def record_schema() -> Any:
    """The Arrow schema of records: one column per ``Record`` field; ``n_best`` is null unless asked for."""
    pa = _pyarrow()
    alternative = pa.struct([("caption", pa.string()), ("score", pa.float64())])
    return pa.schema(
        [
            ("path", pa.string()),
            ("caption", pa.string()),
            ("score", pa.float64()),
            ("n_best", pa.list_(alternative)),
            ("error_code", pa.string()),
            ("error_message", pa.string()),
        ]
    )


def records_to_table(records: Sequence[Record]) -> Any:
    """Records -> a ``pyarrow.Table`` of ``record_schema()``."""
    pa = _pyarrow()
    columns = {
        "path": [record.path for record in records],
        "caption": [record.caption for record in records],
        "score": [record.score for record in records],
        "n_best": [
            None if record.n_best is None else [{"caption": c, "score": s} for c, s in record.n_best]
            for record in records
        ],
        "error_code": [record.error_code for record in records],
        "error_message": [record.error_message for record in records],
    }
    return pa.Table.from_pydict(columns, schema=record_schema())


def records_from_table(table: Any) -> list[Record]:
    """A table with the columns of ``record_schema()`` -> records, in row order."""
    rows = table.select([field.name for field in record_schema()]).to_pylist()
    records = []
    for row in rows:
        n_best = row["n_best"]
        alternatives = None if n_best is None else [(item["caption"], item["score"]) for item in n_best]
        records.append(
            Record(row["path"], row["caption"], row["score"], alternatives, row["error_code"], row["error_message"])
        )
    return records


def is_parquet_pattern(output: str) -> bool:
    folder = output[: -len(PARQUET_PATTERN)]
    return output.endswith(PARQUET_PATTERN) and (not folder or folder.endswith("/"))


class ParquetOutput:
    """``DIR/*.parquet``: atomic part files, resumed by the ``path`` column (see the module's docstring)."""

    def __init__(self, folder: Path, rows_per_part: int = 4096, seconds_per_part: float = 30.0) -> None:
        self.folder = folder
        self.rows_per_part, self.seconds_per_part = rows_per_part, seconds_per_part
        self._pending: list[Record] = []
        self._last_part = time.monotonic()
        self._lock: io.BufferedWriter | None = None
        _pyarrow()  # fail before any work when pyarrow is missing

    def resume(self, inputs: set[str]) -> set[str]:
        pq = _pyarrow().parquet
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / _LOCK_NAME, "ab")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise InputError(f"{self.folder} is being written by another captioner run") from None
        for leftover in self.folder.glob(f".{_PART_PREFIX}*"):  # a part a killed run was writing
            leftover.unlink(missing_ok=True)

        entries: list[_Entry] = []
        tables: dict[Path, Any] = {}
        for part in sorted(self.folder.glob(PARQUET_PATTERN)):
            if part.name.startswith("."):  # Python 3.11's glob matches hidden names too
                continue
            try:
                table = pq.read_table(part, columns=["path", "error_code"])
            except Exception as error:  # pyarrow raises its own kinds; the file is not ours either way
                refusal = f"{part} is not a captioner part ({error}); refusing to modify {self.folder}"
                raise InputError(refusal) from None
            if not part.name.startswith(_PART_PREFIX):
                raise InputError(f"{part} is not a captioner part; refusing to modify {self.folder}")
            tables[part] = table
            for row, (path, code) in enumerate(zip(*table.to_pydict().values(), strict=True)):
                entries.append(_Entry(path, code is None, (part, row)))
        kept = _one_record_per_path(entries, inputs)
        rows_kept: dict[Path, list[int]] = {part: [] for part in tables}
        for entry in kept:
            part, row = entry.raw
            rows_kept[part].append(row)
        for part, table in tables.items():
            if len(rows_kept[part]) == table.num_rows:
                continue
            if not rows_kept[part]:
                part.unlink()
                continue
            whole = pq.read_table(part).take(rows_kept[part])
            write_file_atomically(part, _parquet_bytes(whole))
        return {entry.path for entry in kept if entry.ok} & inputs

    def write(self, records: Sequence[Record]) -> None:
        if self._lock is None:
            raise RuntimeError("resume() must be called before write()")
        self._pending.extend(records)
        if len(self._pending) >= self.rows_per_part or time.monotonic() - self._last_part >= self.seconds_per_part:
            self._write_part()

    def _write_part(self) -> None:
        if self._pending:
            name = f"{_PART_PREFIX}{time.time_ns():020d}-{os.getpid()}.parquet"  # sorts in writing order
            write_file_atomically(self.folder / name, _parquet_bytes(records_to_table(self._pending)))
            self._pending.clear()
        self._last_part = time.monotonic()

    def close(self) -> None:
        if self._lock is not None:
            try:
                self._write_part()
            finally:
                self._lock.close()
                self._lock = None


def _parquet_bytes(table: Any) -> bytes:
    pq = _pyarrow().parquet
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
