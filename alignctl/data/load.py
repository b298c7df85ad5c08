"""Load raw rows: local files (jsonl, json, parquet, csv), data shipped with alignctl, or the hub.

Rows come back as ``Row`` objects that remember their index in the source split, so every later
error can name the row a user has to look at.
"""

from __future__ import annotations

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


@dataclass
class RawSplits:
    train: List[Row]
    eval: Optional[List[Row]]
    source: str  # human-readable origin, for the summary


def load_rows(cfg: DatasetConfig, seed: int) -> RawSplits:
    """Read the configured data set, rename columns, split off eval rows."""
    train, source = _read_split(cfg, cfg.train_split)
    eval_rows: Optional[List[Row]] = None
    if cfg.eval_split:
        eval_rows, _ = _read_split(cfg, cfg.eval_split)
    elif cfg.eval_fraction > 0:
        train, eval_rows = _hold_out(train, cfg.eval_fraction, seed)
    if cfg.max_rows is not None:
        train = train[: cfg.max_rows]
    if not train:
        raise DataError(f"dataset {cfg.name!r} ({source}) has no training rows")
    return RawSplits(train=train, eval=eval_rows, source=source)


def _hold_out(rows: List[Row], fraction: float, seed: int) -> Tuple[List[Row], List[Row]]:
    if not 0 < fraction < 1:
        raise DataError(f"dataset.eval_fraction={fraction}: must be between 0 and 1")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read_split(cfg: DatasetConfig, split: str) -> Tuple[List[Row], str]:
    records, source = _read_records(cfg, split)
    renames = {theirs: ours for ours, theirs in cfg.columns.items()}
    rows = []
    for index, record in enumerate(records):
        if renames:
            record = {renames.get(k, k): v for k, v in record.items()}
        rows.append(Row(index=index, data=record))
    return rows, source


def _read_records(cfg: DatasetConfig, split: str) -> Tuple[List[Dict[str, Any]], str]:
    path_text = cfg.path
    if path_text.startswith(BUILTIN_PREFIX):
        path = BUILTIN_DIR / path_text[len(BUILTIN_PREFIX) :]
        if not path.exists():
            shipped = ", ".join(p.name for p in sorted(BUILTIN_DIR.glob("*.jsonl")))
            raise DataError(f"dataset.path={path_text}: no such built-in data set; shipped: {shipped}")
        return _read_file(path), f"builtin {path.name}"
    path = Path(path_text).expanduser()
    if path.is_file():
        return _read_file(path), str(path)
    if path.is_dir():
        file = _split_file(path, split)
        return _read_file(file), str(file)
    if _looks_like_local_path(path_text):
        raise DataError(f"dataset.path={path_text}: no such file or directory")
    return _read_hub(cfg, split), f"hub {path_text}"


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


def _read_file(path: Path) -> List[Dict[str, Any]]:
    kind = FILE_TYPES.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # malformed file: report where
        raise DataError(f"{path}: cannot be read as {kind}: {_first_line(exc)}") from None
    return table.to_list()


def _read_hub(cfg: DatasetConfig, split: str) -> List[Dict[str, Any]]:
    import datasets

    try:
        table = datasets.load_dataset(cfg.path, cfg.subset, split=split)
    except Exception as exc:
        raise DataError(
            f"dataset.path={cfg.path}: not a local file or directory, and loading it from the hub failed "
            f"({_first_line(exc)}); set dataset.path to a local jsonl/json/parquet/csv file or folder, "
            "or go online"
        ) from None
    return table.to_list()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def encode_each(items: Sequence[T], encode: Callable[[T], U], skip_invalid: bool) -> Tuple[List[U], int]:
    """``encode`` every item; a DataError stops the run, or with ``skip_invalid`` drops the item.

    Returns the encoded items and how many were dropped.
    """
    out: List[U] = []
    skipped = 0
    for item in items:
        try:
            out.append(encode(item))
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    return out, skipped


def require_text(row: Row, field: str, *, allow_empty: bool = False) -> str:
    """The string in ``field`` of ``row``, or a DataError naming the row and the field."""
    if field not in row.data:
        raise DataError(f"row {row.index}: missing column '{field}' (columns: {', '.join(row.data)})")
    value = row.data[field]
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
