"""Batch captioning machinery behind ``captioner caption``: listing inputs, sharding, decoding images in
background threads while the model works on full batches, and output files that survive being killed.

Output files and resuming
    Records are appended a batch at a time, each batch in one write followed by flush and ``os.fsync``,
    so a killed run loses at most the batch in flight and can leave at most one incomplete line at the
    end of the file. A later run with the same ``--output`` first repairs the file (that last line is
    cut off), then skips every image that already has a *caption* record. Images with an *error* record
    are tried again: their old error records are removed before the run starts (the file is rewritten
    beside itself and renamed into place, so it is never half-written), and the new attempt appends a
    fresh record. So once a run finishes, the file holds exactly one record per input image. Records of
    paths that are not inputs of the current run are left alone. A file whose content is not records of
    this program (other than a damaged last line) is never modified: the run stops with an error.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TextIO, TypeVar

from captioner.errors import CaptionerError, ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
CSV_COLUMNS = ("path", "caption", "score", "error")
_GLOB_CHARACTERS = frozenset("*?[")
_JSON_RECORD_START = b'{"path": '
# Paths may be any bytes on POSIX; surrogateescape carries undecodable bytes through to the output unchanged.
_ENCODING, _ERRORS = "utf-8", "surrogateescape"

T = TypeVar("T")


class InputError(CaptionerError):
    """A PATH argument that names no file, folder or glob match, or an unusable output file."""

    code = "invalid_input"


# ----------------------------------------------------------------------------------------------- inputs


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _folder_images(folder: str, recursive: bool) -> list[str]:
    """Image files in a folder by extension, hidden entries (names starting with ".") skipped: they are
    editor and OS artefacts such as macOS's ``._photo.jpg``, which carry an image extension but no image."""
    found = []
    for root, folders, files in os.walk(folder, onerror=_warn_unlistable):
        folders[:] = [name for name in folders if not name.startswith(".")] if recursive else []
        found.extend(os.path.join(root, name) for name in files if not name.startswith(".") and is_image_name(name))
    return found


def _warn_unlistable(error: OSError) -> None:
    print(f"captioner: warning: cannot list {error.filename}: {error.strerror}", file=sys.stderr)


def list_inputs(arguments: Sequence[str], recursive: bool = False) -> list[str]:
    """The images named by PATH arguments: sorted, without duplicates.

    A file is taken whatever its extension (it was named on purpose); a folder contributes the images
    inside it, chosen by extension (``recursive`` descends into sub-folders). A glob pattern is expanded
    here, the way a shell would (``**`` included), so quoted patterns behave like unquoted ones: its
    matching files are taken as named and its matching folders as folders. An argument that exists as
    a path is never treated as a pattern, so a file called ``a[1].jpg`` can be named directly.

    Paths are reported in the form given, normalised (``./a//b.jpg`` -> ``a/b.jpg``): that string is
    the record's key for resuming and sharding. The same file reached twice through different spellings
    is kept once, under the spelling that sorts first.

    Raises:
        InputError: an argument names nothing.
    """
    candidates: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            candidates.extend(_folder_images(argument, recursive))
        elif os.path.lexists(argument):
            candidates.append(argument)
        elif _GLOB_CHARACTERS & set(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise InputError(f"no file matches {argument!r}")
            for match in matches:
                candidates.extend(_folder_images(match, recursive) if os.path.isdir(match) else [match])
        else:
            raise InputError(f"no such file or folder: {argument!r}")
    by_file: dict[str, str] = {}
    for candidate in candidates:
        shown = os.path.normpath(candidate)
        key = os.path.abspath(shown)
        if key not in by_file or shown < by_file[key]:
            by_file[key] = shown
    return sorted(by_file.values())


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; raises ValueError otherwise."""
    index_text, slash, count_text = text.partition("/")
    if not slash or not index_text.strip().isdigit() or not count_text.strip().isdigit():
        raise ValueError(f"a shard is written I/N with whole numbers, e.g. 0/4, not {text!r}")
    index, count = int(index_text), int(count_text)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r} is out of range: N must be >= 1 and 0 <= I < N")
    return index, count


def shard_of(path: str, count: int) -> int:
    """The shard (0..count-1) a path belongs to: a stable hash of the path string, so every machine
    computes the same split of the same inputs without talking to the others (Python's ``hash`` is
    salted per process and would not do)."""
    digest = hashlib.sha1(path.encode(_ENCODING, _ERRORS)).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(paths: Iterable[str], index: int, count: int) -> list[str]:
    return [path for path in paths if shard_of(path, count) == index]


def attention_file_names(paths: Sequence[str]) -> dict[str, str]:
    """``<stem>.attention.png`` for every path, with ``-2``, ``-3``... added to repeated stems.

    Call it with the full, sorted input list (before sharding and resuming) so an image's file name
    does not depend on which other images a particular run processes.
    """
    names: dict[str, str] = {}
    used: set[str] = set()
    for path in paths:
        stem = Path(path).stem or "image"
        candidate, number = stem, 1
        while candidate.lower() in used:  # case-insensitive file systems would merge "A" and "a"
            number += 1
            candidate = f"{stem}-{number}"
        used.add(candidate.lower())
        names[path] = f"{candidate}.attention.png"
    return names


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """The outcome for one image: a caption (and alternatives), or an error."""

    path: str
    caption: str | None = None
    score: float | None = None
    n_best: list[tuple[str, float]] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @classmethod
    def failure(cls, path: str, error: CaptionerError) -> Record:
        return cls(path, error_code=error.code, error_message=error.message)

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"path": self.path, "error": {"code": self.error_code, "message": self.error_message}}
        data: dict[str, Any] = {"path": self.path, "caption": self.caption, "score": self.score}
        if self.n_best is not None:
            data["n_best"] = [{"caption": caption, "score": score} for caption, score in self.n_best]
        return data

    def to_row(self) -> list[str]:
        if not self.ok:
            return [self.path, "", "", f"{self.error_code}: {self.error_message}"]
        return [self.path, self.caption or "", repr(self.score), ""]


class Output(Protocol):
    """Where records go. ``resume`` is called once before any ``write``."""

    def resume(self, inputs: set[str]) -> set[str]:
        """Prepare to append; return the inputs that already have a caption record (to be skipped)."""
        ...

    def write(self, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


class StreamOutput:
    """``path<TAB>caption`` lines on stdout, errors on stderr; nothing to resume."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err

    def resume(self, inputs: set[str]) -> set[str]:
        return set()

    def write(self, records: Sequence[Record]) -> None:
        from tqdm import tqdm

        # tqdm.write lifts a progress bar drawn on the same terminal out of the way of the line.
        for record in records:
            if record.ok:
                tqdm.write(f"{record.path}\t{record.caption}", file=self.out)
            else:
                tqdm.write(f"captioner: {record.path}: {record.error_code}: {record.error_message}", file=self.err)
        self.out.flush()

    def close(self) -> None:
        self.out.flush()


@dataclass
class _Entry:
    """One record read back from an output file."""

    path: str
    ok: bool
    raw: Any  # the line (JSONL) or row (CSV) to write back unchanged


class _FileOutput:
    """Shared resume/append logic; subclasses read and format their own lines."""

    header: bytes = b""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stream: io.BufferedWriter | None = None

    # Subclasses: parse the file's bytes into entries plus the byte offset where the valid part ends.
    def _scan(self, data: bytes) -> tuple[list[_Entry], int]:
        raise NotImplementedError

    def _format(self, entries: Sequence[_Entry]) -> bytes:
        raise NotImplementedError

    def _encode(self, records: Sequence[Record]) -> bytes:
        raise NotImplementedError

    def resume(self, inputs: set[str]) -> set[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stream = self._open_locked()
        data = self.path.read_bytes()
        entries, valid_end = self._scan(data)
        if valid_end < len(data):
            print(f"captioner: repairing {self.path}: removing an incomplete last record", file=sys.stderr)
            stream.truncate(valid_end)
            _sync(stream)
        kept = _one_record_per_path(entries, inputs)
        if len(kept) != len(entries):
            write_file_atomically(self.path, self._format(kept))
            replaced, stream = stream, self._open_locked()
            replaced.close()
        if os.fstat(stream.fileno()).st_size == 0:
            stream.write(self.header)
            _sync(stream)
        self._stream = stream
        return {entry.path for entry in kept if entry.ok} & inputs

    def _open_locked(self) -> io.BufferedWriter:
        stream = open(self.path, "ab")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            raise InputError(f"{self.path} is being written by another captioner run") from None
        return stream

    def write(self, records: Sequence[Record]) -> None:
        if self._stream is None:
            raise RuntimeError("resume() must be called before write()")
        if records:
            self._stream.write(self._encode(records))  # one write per batch
            _sync(self._stream)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class JsonlOutput(_FileOutput):
    """One JSON object per line: ``{"path", "caption", "score"[, "n_best"]}`` or ``{"path", "error"}``."""

    def _scan(self, data: bytes) -> tuple[list[_Entry], int]:
        *lines, tail = data.split(b"\n")  # ``tail`` follows the last newline: b"" unless a write was cut short
        entries: list[_Entry] = []
        offset = 0
        for number, line in enumerate(lines, start=1):
            try:
                value = json.loads(line.decode(_ENCODING, _ERRORS))
            except ValueError:
                # Whole lines are written at once, so a complete but unparsable line is what a crash of
                # the machine leaves (zeros where data never reached the disk); only the last may be cut.
                if number == len(lines) and not tail and _damaged_record(line):
                    return entries, offset
                raise InputError(f"{self.path} line {number} is not JSON; refusing to modify the file") from None
            entry = _json_entry(value)
            if entry is None:
                raise InputError(f"{self.path} line {number} is not a captioner record; refusing to modify the file")
            entry.raw = line
            entries.append(entry)
            offset += len(line) + 1
        if tail and not _damaged_record(tail):
            raise InputError(f"{self.path} ends in something that is not a captioner record; refusing to modify it")
        return entries, offset

    def _format(self, entries: Sequence[_Entry]) -> bytes:
        return b"".join(entry.raw + b"\n" for entry in entries)

    def _encode(self, records: Sequence[Record]) -> bytes:
        text = "".join(json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records)
        return text.encode(_ENCODING, _ERRORS)


def _damaged_record(line: bytes) -> bool:
    """Whether a line can be the remains of a record this program wrote (every record starts with
    ``{"path": ``), or NUL bytes from a crash, as opposed to someone else's data."""
    return line.startswith(_JSON_RECORD_START) or _JSON_RECORD_START.startswith(line) or not line.strip(b"\0")


def _json_entry(value: Any) -> _Entry | None:
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        return None
    if isinstance(value.get("caption"), str):
        return _Entry(value["path"], True, None)
    if isinstance(value.get("error"), dict):
        return _Entry(value["path"], False, None)
    return None


class CsvOutput(_FileOutput):
    """CSV with the columns path, caption, score, error (``code: message``), written by the csv module."""

    header = (",".join(CSV_COLUMNS) + "\n").encode()

    def _scan(self, data: bytes) -> tuple[list[_Entry], int]:
        if len(data) < len(self.header) and self.header.startswith(data):
            return [], 0  # empty, or killed while writing the header
        if not data.startswith(self.header):
            raise InputError(
                f"{self.path} does not start with the header {','.join(CSV_COLUMNS)}; refusing to modify it"
            )
        consumed = [len(self.header)]

        def lines() -> Iterator[str]:
            # Feed the reader one line at a time, counting bytes, so the end of every row is known
            # even when a quoted field (a path) contains a newline.
            for piece in data[len(self.header) :].splitlines(keepends=True):
                consumed[0] += len(piece)
                yield piece.decode(_ENCODING, _ERRORS)

        reader = csv.reader(lines(), strict=True)
        entries: list[_Entry] = []
        offset = len(self.header)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return entries, offset
            except csv.Error:  # an unterminated quoted field: an interrupted last write leaves one
                if consumed[0] == len(data):
                    return entries, offset
                raise InputError(
                    f"{self.path} row {len(entries) + 1} is not valid CSV; refusing to modify it"
                ) from None
            complete = data[consumed[0] - 1 : consumed[0]] in (b"\n", b"\r")
            entry = _csv_entry(row)
            if entry is None or not complete:
                if consumed[0] == len(data):
                    return entries, offset
                raise InputError(f"{self.path} row {len(entries) + 1} is not a captioner record; refusing to modify it")
            entry.raw = row
            entries.append(entry)
            offset = consumed[0]

    def _format(self, entries: Sequence[_Entry]) -> bytes:
        return self.header + _csv_bytes(entry.raw for entry in entries)

    def _encode(self, records: Sequence[Record]) -> bytes:
        return _csv_bytes(record.to_row() for record in records)


def _csv_entry(row: list[str]) -> _Entry | None:
    if len(row) != len(CSV_COLUMNS) or not row[0]:
        return None
    path, caption, score, error = row
    if error:
        return _Entry(path, False, None) if not caption and not score else None
    try:
        float(score)
    except ValueError:
        return None
    return _Entry(path, True, None)


def _csv_bytes(rows: Iterable[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue().encode(_ENCODING, _ERRORS)


def _one_record_per_path(entries: Sequence[_Entry], inputs: set[str]) -> list[_Entry]:
    """The entries to keep, in file order: a path's first caption record; failing that, for a path this
    run does not retry, its first error record. Error records of this run's inputs go (retried)."""
    captioned: dict[str, int] = {}
    for position, entry in enumerate(entries):
        if entry.ok:
            captioned.setdefault(entry.path, position)
    kept, failed = [], set()
    for position, entry in enumerate(entries):
        if entry.ok:
            if captioned[entry.path] == position:
                kept.append(entry)
        elif entry.path not in captioned and entry.path not in inputs and entry.path not in failed:
            failed.add(entry.path)
            kept.append(entry)
    return kept


def _sync(stream: io.BufferedWriter) -> None:
    stream.flush()
    os.fsync(stream.fileno())


def write_file_atomically(path: Path, content: bytes, durable: bool = True) -> None:
    """Write ``content`` beside ``path`` and rename it into place, so readers (and a resumed run) see the
    old file or the new one, never a half-written one. ``durable`` also survives a machine crash."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
            if durable:
                _sync(stream)  # type: ignore[arg-type]
        # mkstemp makes the file private (0600); keep the permissions the file had, or the usual 0644.
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


def open_output(path: str | None, out: TextIO, err: TextIO) -> Output:
    """The output for ``--output``: JSONL or CSV by suffix, Parquet part files for ``DIR/*.parquet``, or
    stdout when no file is given."""
    if path is None:
        return StreamOutput(out, err)
    from captioner.parquet_output import ParquetOutput, is_parquet_pattern  # needs pyarrow: only when asked

    if is_parquet_pattern(path):
        return ParquetOutput(Path(path).parent)
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return JsonlOutput(Path(path))
    if suffix == ".csv":
        return CsvOutput(Path(path))
    raise InputError(f"--output must end in .jsonl or .csv, or be DIR/*.parquet, not {path!r}")


# ----------------------------------------------------------------------------------- background decoding


@dataclass(frozen=True)
class Decoded(Generic[T]):
    path: str
    value: T | None
    error: ImageError | None


def _attempt(decode: Callable[[str], T], path: str) -> Decoded[T]:
    try:
        return Decoded(path, decode(path), None)
    except ImageError as error:
        return Decoded(path, None, error)


def decode_in_background(
    paths: Sequence[str], decode: Callable[[str], T], workers: int, prefetch: int
) -> Iterator[Decoded[T]]:
    """``decode(path)`` for every path, run by ``workers`` threads up to ``prefetch`` images ahead; results
    come back in input order. Threads suffice: PIL decoding and torch's tensor maths release the GIL.
    ``workers=0`` decodes in the calling thread (useful for debugging). ImageError becomes ``.error``."""
    if workers == 0:
        for path in paths:
            yield _attempt(decode, path)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captioner-decode")
    pending: deque[Future[Decoded[T]]] = deque()
    remaining = iter(paths)
    try:
        for path in remaining:
            pending.append(pool.submit(_attempt, decode, path))
            if len(pending) >= max(prefetch, 1):
                break
        while pending:
            done = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(_attempt, decode, following))
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; otherwise a plain line every ``interval`` seconds,
    because a bar redrawn with carriage returns turns a log file into one enormous line."""

    def __init__(self, total: int, stream: TextIO, interval: float = 10.0) -> None:
        self.total, self.stream, self.interval = total, stream, interval
        self.done = self.failed = 0
        self.start = self._last_log = time.monotonic()
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            columns, lines = _terminal_size(stream)
            self._bar = tqdm(total=total, unit="img", file=stream, ncols=columns, nrows=lines, smoothing=0.1)

    def update(self, records: Sequence[Record]) -> None:
        self.done += len(records)
        self.failed += sum(not record.ok for record in records)
        if self._bar is not None:
            self._bar.update(len(records))
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        elif time.monotonic() - self._last_log >= self.interval:
            self._last_log = time.monotonic()
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        return f"captioner: {self.done}/{self.total} images, {self.failed} failed, {rate:.1f} images/s, ETA {eta_text}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _terminal_size(stream: TextIO) -> tuple[int, int]:
    """The terminal's (columns, lines). Pseudo-terminals that report 0 x 0 (containers, CI runners) would
    make tqdm hide the bar entirely, so they get the classic 80 x 24."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return 80, 24
    return size.columns or 80, size.lines or 24


# ------------------------------------------------------------------------------------------------- run


@dataclass
class Summary:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> count

    def count(self, records: Sequence[Record]) -> None:
        for record in records:
            if record.ok:
                self.captioned += 1
            else:
                self.failed += 1
                self.errors[record.error_code or ""] = self.errors.get(record.error_code or "", 0) + 1


def run_batches(
    paths: Sequence[str],
    decode: Callable[[str], T],
    caption_batch: Callable[[list[Decoded[T]]], list[Record]],
    output: Output,
    batch_size: int,
    workers: int,
    progress: Progress,
) -> Summary:
    """Decode in the background, caption full batches of decoded images, write the records per batch.

    The records of a batch are written together with the failures met since the previous batch, in
    input order, so a fresh run's file is in input order and a killed run loses at most one batch.
    """
    summary = Summary()
    start = time.monotonic()
    ready: list[Decoded[T]] = []
    failed: list[tuple[int, Record]] = []
    indices: dict[str, int] = {}

    def flush() -> None:
        captioned = caption_batch(ready) if ready else []
        numbered = [(indices[item.path], record) for item, record in zip(ready, captioned, strict=True)]
        records = [record for _, record in sorted(numbered + failed, key=lambda pair: pair[0])]
        output.write(records)
        progress.update(records)
        summary.count(records)
        ready.clear()
        failed.clear()

    prefetch = 2 * batch_size + workers  # the next batch decodes while the model works on this one
    # closing(): on an error or Ctrl-C the decoding threads are stopped now, not when garbage is collected.
    with contextlib.closing(decode_in_background(paths, decode, workers, prefetch)) as decoded:
        for index, item in enumerate(decoded):
            indices[item.path] = index
            if item.error is not None:
                failed.append((index, Record.failure(item.path, item.error)))
            else:
                ready.append(item)
            # A full batch goes to the model; a run of failures alone is written out too (keeping input
            # order, since nothing earlier waits) so that progress shows and a kill does not lose it.
            if len(ready) >= batch_size or (not ready and len(failed) >= batch_size):
                flush()
    if ready or failed:
        flush()
    summary.seconds = time.monotonic() - start
    return summary
