"""Load raw rows: local files (jsonl, json, parquet, csv), data shipped with alignctl, or the hub.

Rows come back as ``Row`` objects that remember their index in the source split, so every later
error can name the row a user has to look at.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from alignctl.config import DatasetConfig
from alignctl.errors import DataError

T = TypeVar("T")
U = TypeVar("U")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "smoke"
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Row:
    index: int  # position in the source split, for error messages
    data: Dict[str, Any]
    source: str = ""  # the file (or hub split) it came from, for error messages
    line: Optional[int] = None  # its line in a JSON-lines file


@dataclass
class RawSplits:
    train: List[Row]
    eval: Optional[List[Row]]
    source: str  # human-readable origin, for the summary
    eval_origin: str = ""  # where the eval rows came from (or why there are none), for the summary


# dataset.eval_fraction=null (auto) holds out AUTO_EVAL_FRACTION of a training split of at least
# AUTO_EVAL_MIN_ROWS rows: 100+ eval rows (an accuracy's standard error under 5 points) for 5% of
# the data; a smaller file keeps every row for training unless the user asks for a split.
AUTO_EVAL_MIN_ROWS = 2000
AUTO_EVAL_FRACTION = 0.05


def load_rows(cfg: DatasetConfig, seed: int, hold_out: bool = True) -> RawSplits:
    """Read the configured data set, rename columns, split off eval rows (``hold_out=False``: an
    algorithm that does not evaluate; dataset.eval_fraction=null then holds nothing out)."""
    train, source = _read_split(cfg, cfg.train_split)
    eval_rows: Optional[List[Row]] = None
    fraction = cfg.eval_fraction
    if cfg.eval_split:
        eval_rows, _ = _read_split(cfg, cfg.eval_split)
        origin = f"split {cfg.eval_split!r}"
    elif fraction is not None:
        origin = f"dataset.eval_fraction={fraction} of {len(train)} rows" if fraction > 0 else "none (dataset.eval_fraction=0)"
    elif hold_out and len(train) >= AUTO_EVAL_MIN_ROWS:
        fraction = AUTO_EVAL_FRACTION
        origin = (f"{AUTO_EVAL_FRACTION:.0%} of {len(train)} rows held out (dataset.eval_fraction=null: "
                  f"data sets of >= {AUTO_EVAL_MIN_ROWS} rows); dataset.eval_fraction=0 keeps them all")
    else:
        origin = (f"none ({len(train)} rows < {AUTO_EVAL_MIN_ROWS}: nothing held out unasked); "
                  "set dataset.eval_fraction=0.1 or dataset.eval_split to evaluate")
    if not cfg.eval_split and fraction:
        train, eval_rows = _hold_out(train, fraction, seed)
    if cfg.max_rows is not None:
        train = train[: cfg.max_rows]
    if eval_rows is not None and cfg.max_eval_rows is not None and len(eval_rows) > cfg.max_eval_rows:
        eval_rows = eval_rows[: cfg.max_eval_rows]
        origin += f", its first {cfg.max_eval_rows} rows (dataset.max_eval_rows)"
    if not train:
        raise DataError(f"dataset {cfg.name!r} ({source}) has no training rows")
    return RawSplits(train=train, eval=eval_rows, source=source, eval_origin=origin)


def check_files(cfg: DatasetConfig) -> None:
    """Before a run starts: each split's local file exists, its start reads, and ``dataset.columns``
    names its columns. (Hub data sets are checked when read; load_rows checks every row.)"""
    for split in [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split else []):
        path = split_path(cfg, split)
        if path is not None:
            columns = peek_columns(path)
            if columns:
                check_renames(cfg, columns, _describe(cfg, path))


def peek_split_columns(cfg: DatasetConfig, split: str) -> Optional[List[str]]:
    """The columns of a local split after the ``dataset.columns`` renames, from the start of its
    file (cheap); None for a hub data set, which must be read to know them."""
    path = split_path(cfg, split)
    if path is None:
        return None
    columns = peek_columns(path)
    if not cfg.columns:
        return columns
    check_renames(cfg, columns, _describe(cfg, path))
    return list(rename_columns(dict.fromkeys(columns), cfg.columns))


def _hold_out(rows: List[Row], fraction: float, seed: int) -> Tuple[List[Row], List[Row]]:
    if not 0 < fraction < 1:
        raise DataError(f"dataset.eval_fraction={fraction}: must be between 0 and 1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read_split(cfg: DatasetConfig, split: str) -> Tuple[List[Row], str]:
    records, lines, source = _read_records(cfg, split)
    if records:
        check_renames(cfg, list(records[0]), source)
    rows = []
    for index, record in enumerate(records):
        if cfg.columns:
            record = rename_columns(record, cfg.columns)
        rows.append(Row(index=index, data=record, source=source, line=lines[index] if lines else None))
    return rows, source


def check_renames(cfg: DatasetConfig, columns: Sequence[str], source: str) -> None:
    """Every ``dataset.columns`` rename must name a column the data has."""
    for ours, theirs in cfg.columns.items():
        if theirs not in columns:
            raise DataError(
                f"dataset.columns.{ours}={theirs}: {source} has no column '{theirs}' (its columns: "
                f"{', '.join(columns) or 'none'}); set dataset.columns.{ours} to one of them, or drop it"
            )


def rename_columns(record: Dict[str, Any], columns: Dict[str, str]) -> Dict[str, Any]:
    """Apply ``{ours: theirs}`` renames; a renamed column replaces a column already called ``ours``."""
    renames = {theirs: ours for ours, theirs in columns.items()}
    out: Dict[str, Any] = {}
    for key, value in record.items():
        if key in renames:
            out[renames[key]] = value
        elif key in columns and columns[key] in record:
            continue  # replaced by the column renamed to it
        elif key not in out:
            out[key] = value
    return out


def _read_records(cfg: DatasetConfig, split: str) -> Tuple[List[Dict[str, Any]], Optional[List[int]], str]:
    """(records, their line numbers (JSON lines only), where they came from)."""
    local = split_path(cfg, split)
    if local is None:
        return _read_hub(cfg, split), None, f"hub {cfg.path} ({split})"
    records, lines = _read_file(local)
    return records, lines, _describe(cfg, local)


def split_path(cfg: DatasetConfig, split: str) -> Optional[Path]:
    """The local file holding ``split``; None for a hub data set. Missing files are a DataError."""
    path_text = cfg.path
    if path_text.startswith(BUILTIN_PREFIX):
        path = BUILTIN_DIR / path_text[len(BUILTIN_PREFIX) :]
        if not path.exists():
            shipped = ", ".join(p.name for p in sorted(BUILTIN_DIR.glob("*.jsonl")))
            raise DataError(f"dataset.path={path_text}: no such built-in data set; shipped: {shipped}")
        return path
    path = Path(path_text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _split_file(path, split)
    if _looks_like_local_path(path_text):
        raise DataError(f"dataset.path={path_text}: no such file or directory")
    return None


def _describe(cfg: DatasetConfig, path: Path) -> str:
    return f"builtin {path.name}" if cfg.path.startswith(BUILTIN_PREFIX) else str(path)


def _looks_like_local_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or Path(text).suffix in FILE_TYPES or text.count("/") > 1


def _split_file(folder: Path, split: str) -> Path:
    """``<folder>/<split>.<ext>`` (also ``<split>-*.ext`` shards are not supported: merge them first)."""
    for suffix in FILE_TYPES:
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    found = ", ".join(sorted(p.name for p in folder.iterdir() if p.suffix in FILE_TYPES)) or "none"
    raise DataError(
        f"dataset.path={folder}: no file for split '{split}' (looked for {split}.jsonl/.json/.parquet/.csv; "
        f"data files there: {found}); set dataset.train_split / dataset.eval_split to a file's stem"
    )


WHAT_FILE = {
    "json": "one JSON object per line (.jsonl), or a JSON list of objects (.json)",
    "csv": "CSV text with a header line",
    "parquet": "a parquet file",
}


def _file_kind(path: Path) -> str:
    kind = FILE_TYPES.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    return kind


def _read_file(path: Path) -> Tuple[List[Dict[str, Any]], Optional[List[int]]]:
    """The records of a local file, and their line numbers for JSON lines.

    A bad file (empty, binary, malformed, rows that are not objects) is one DataError naming the
    file and, where it can, the line.
    """
    kind = _file_kind(path)
    if kind == "parquet":
        return _read_parquet(path), None
    text = _decode(path, _read_bytes(path), kind)
    if kind == "csv":
        return _read_csv(path, text), None
    return _read_json(path, text)


def peek_columns(path: Path) -> List[str]:
    """The columns of a local file from its header or first row (cheap: the whole file is not read,
    except a JSON list); a bad start of the file is the DataError the full read would raise."""
    kind = _file_kind(path)
    if kind == "parquet":
        return _parquet_table(path, schema_only=True)
    with _open(path) as file:
        head = file.read(1 << 16)
        while b"\n" not in head.lstrip():  # until a whole non-blank first line (or the end of the file)
            more = file.read(1 << 20)
            if not more:
                break
            head += more
    text = _decode(path, head, kind, partial=True)  # empty and binary files stop here
    if kind == "csv":
        return list(_csv_frame(path, str(path), nrows=1).columns)
    lines = text.split("\n")
    number, first = next((i, line) for i, line in enumerate(lines, 1) if line.strip())
    try:
        if text.lstrip().startswith("["):
            raise ValueError("a JSON list: read it whole")
        return list(_object(path, f"line {number}", json.loads(first)))
    except ValueError:  # read the file: a precise error, or a JSON document
        records, _ = _read_file(path)
        return list(records[0]) if records else []


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def _read_bytes(path: Path) -> bytes:
    with _open(path) as file:
        return file.read()


def _decode(path: Path, data: bytes, kind: str, partial: bool = False) -> str:
    """UTF-8 text of a data file; empty and binary files are refused."""
    if not data.strip():
        raise DataError(f"{path}: the file is empty; it should hold {WHAT_FILE[kind]}")
    nul = data.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise DataError(
            f"{path}: binary content (a NUL byte at offset {nul}), not {kind} text; it should hold {WHAT_FILE[kind]}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if partial and exc.start >= len(data) - 3:
            return data[: exc.start].decode("utf-8-sig")  # a character cut by a partial read
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None


def _read_json(path: Path, text: str) -> Tuple[List[Dict[str, Any]], Optional[List[int]]]:
    body = text.lstrip()
    if body.startswith("["):
        return _json_document(path, text), None
    records: List[Dict[str, Any]] = []
    numbers: List[int] = []
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and friends
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if not records and body.startswith("{"):
                try:  # one JSON object written over several lines?
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = None
                if value is not None:
                    return _document_rows(path, value), None
            last = not any(rest.strip() for rest in lines[number:])
            raise _line_error(path, number, line, exc, last) from None
        records.append(_object(path, f"line {number}", value))
        numbers.append(number)
    return _fill_missing(records), numbers


def _line_error(path: Path, number: int, line: str, exc: json.JSONDecodeError, last: bool) -> DataError:
    cut = last and (exc.pos >= len(line.rstrip()) or exc.msg.startswith("Unterminated string"))
    why = "; the line is cut short (was the file truncated?)" if cut else ""
    return DataError(
        f"{path}, line {number}: invalid JSON ({exc.msg}, column {exc.colno}){why}; each line must be one "
        "complete JSON object: fix or remove the line"
    )


def _json_document(path: Path, text: str) -> List[Dict[str, Any]]:
    """A whole-file JSON value: a list of objects, or an object of equal-length column lists."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    return _document_rows(path, value)


def _document_rows(path: Path, value: Any) -> List[Dict[str, Any]]:
    if isinstance(value, list):
        return _fill_missing([_object(path, f"item {i}", item) for i, item in enumerate(value)])
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:  # columns
            return [dict(zip(value, items)) for items in zip(*value.values())]
    what = f"one JSON object (keys: {', '.join(value)})" if isinstance(value, dict) else _json_type(value)
    raise DataError(f"{path}: holds {what}, not rows; it should hold {WHAT_FILE['json']}")


def _object(path: Path, where: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(
            f"{path}, {where}: a row must be a JSON object ({{\"column\": value, ...}}), got {_json_type(value)}"
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__


def _fill_missing(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Give every record every column (None where absent), in first-seen order, as a table would."""
    columns: Dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    keys = list(columns)
    if all(len(record) == len(keys) for record in records):
        return records
    return [{k: record.get(k) for k in keys} for record in records]


def _csv_frame(path: Path, source: Any, nrows: Optional[int] = None):
    import pandas

    try:
        return pandas.read_csv(source, nrows=nrows)
    except (pandas.errors.ParserError, pandas.errors.EmptyDataError, ValueError) as exc:
        raise DataError(
            f"{path}: cannot be read as CSV ({_first_line(exc)}); it should hold {WHAT_FILE['csv']}"
        ) from None


def _read_csv(path: Path, text: str) -> List[Dict[str, Any]]:
    """As the datasets library reads CSV: pandas, then an Arrow table (missing values become None)."""
    import pyarrow

    frame = _csv_frame(path, io.StringIO(text))
    try:
        return pyarrow.Table.from_pandas(frame, preserve_index=False).to_pylist()
    except (pyarrow.ArrowException, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({_first_line(exc)})") from None


def _read_parquet(path: Path) -> List[Dict[str, Any]]:
    return _parquet_table(path).to_pylist()


def _parquet_table(path: Path, schema_only: bool = False):
    import pyarrow
    import pyarrow.parquet as pq

    with _open(path) as file:
        start = file.read(4)
        file.seek(0, 2)
        size = file.tell()
        file.seek(max(0, size - 4))
        end = file.read(4)
    if size == 0:
        raise DataError(f"{path}: the file is empty; it should hold {WHAT_FILE['parquet']}")
    if start != b"PAR1" or end != b"PAR1":
        raise DataError(
            f"{path}: not a parquet file (it lacks parquet's PAR1 markers: truncated, or another format saved "
            "as .parquet)"
        )
    try:
        if schema_only:
            return list(pq.read_schema(path).names)
        return pq.read_table(path)
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as parquet ({_first_line(exc)}); the file may be corrupt") from None


def _read_hub(cfg: DatasetConfig, split: str) -> List[Dict[str, Any]]:
    import datasets

    offline = hub_offline_reason()
    try:
        with _offline_mode(offline is not None):  # no network: only a cached copy, without retries
            table = datasets.load_dataset(cfg.path, cfg.subset, split=split)
    except Exception as exc:
        why = f"the hub cannot be reached ({offline}) and there is no cached copy" if offline else (
            f"loading it from the hub failed ({_first_line(exc)})"
        )
        raise DataError(
            f"dataset.path={cfg.path}: not a local file or directory, and {why}; point dataset.path at a "
            f"local file or a folder with {split}.jsonl (or .json/.parquet/.csv), or go online"
        ) from None
    return table.to_list()


def hub_offline_reason() -> Optional[str]:
    """Why the hub cannot be reached (offline mode set, or its host does not resolve), or None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        # Without this check the hub client retries for about half a minute, logging each retry.
        return f"{host} does not resolve: no network?"
    return None


@contextlib.contextmanager
def _offline_mode(on: bool):
    """Put datasets and huggingface_hub in offline mode for one call (they read these flags per call)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if on:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


SKIP_HINT = "fix the row, or set dataset.skip_invalid=true to skip and count such rows"


def encode_each(items: Sequence[T], encode: Callable[[T], U], skip_invalid: bool) -> Tuple[List[U], int]:
    """``encode`` every item; a DataError stops the run (saying how to skip such rows), or with
    ``skip_invalid`` drops the item.

    Returns the encoded items and how many were dropped.
    """
    out: List[U] = []
    skipped = 0
    for item in items:
        try:
            out.append(encode(item))
        except DataError as exc:
            if getattr(exc, "every_row", False):
                raise  # a problem of the setup, not of this row (no chat template): skipping rows cannot help
            if not skip_invalid:
                if "skip_invalid" in str(exc):
                    raise
                raise DataError(f"{exc}; {SKIP_HINT}") from None
            skipped += 1
    return out, skipped


def names_file(build: Callable[..., U]) -> Callable[..., U]:
    """Decorate ``build(rows, ...)``: a DataError it raises names the file the rows came from, and
    the line of the row it names (JSON lines)."""

    @functools.wraps(build)
    def wrapper(rows: Sequence[Row], *args: Any, **kwargs: Any) -> U:
        try:
            return build(rows, *args, **kwargs)
        except DataError as exc:
            if getattr(exc, "names_file", False) or not rows or not rows[0].source:
                raise
            message = str(exc)
            if message.startswith("row "):
                index = message[4:].split(":", 1)[0]
                line = next((r.line for r in rows if str(r.index) == index), None)
                if line is not None:
                    message = f"row {index} (line {line}){message[4 + len(index):]}"
            located = DataError(f"{rows[0].source}: {message}")
            located.names_file = True
            raise located from None

    return wrapper


def require_text(row: Row, field: str, *, allow_empty: bool = False) -> str:
    """The string in ``field`` of ``row``, or a DataError naming the row and the field."""
    if field not in row.data:
        raise DataError(
            f"row {row.index}: missing column '{field}' (columns: {', '.join(row.data) or 'none'}); map yours "
            f"with dataset.columns.{field}=<your column>"
        )
    value = row.data[field]
    if value is None:
        raise DataError(f"row {row.index}: column '{field}' is missing or null")
    if not isinstance(value, str):
        raise DataError(f"row {row.index}: column '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"row {row.index}: column '{field}' is empty")
    return value


def require_messages(row: Row, field: str) -> List[Dict[str, str]]:
    """A list of {"role", "content"} messages in ``field``, validated."""
    value = row.data.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"row {row.index}: column '{field}' must be a non-empty list of messages")
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"row {row.index}: {field}[{turn}] must be a {{'role', 'content'}} message")
        if not isinstance(message["content"], str):
            raise DataError(f"row {row.index}: {field}[{turn}].content must be a string")
    return value
