"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place and renamed into
place only once every file is on disk, so a crash mid-save never leaves a folder named
``step-N`` that resume could pick up. Old checkpoints are pruned only after the new one is
complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from alignctl.errors import AlignctlError

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:07d}"


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, then rename tmp_dir to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AlignctlError(
                f"no space left on the device while writing {final}; nothing was replaced (earlier "
                "checkpoints are intact). Free some space or set run.output_dir elsewhere, then continue "
                "with resume=auto"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], state: dict, keep: Optional[int]) -> Path:
    """Write checkpoint ``step`` (files by ``write``, plus ``state`` as JSON); prune to ``keep``."""

    def write_all(folder: Path) -> None:
        write(folder)
        (folder / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2), encoding="utf-8")

    path = write_atomically(checkpoint_path(run_dir, step), write_all)
    if keep is not None and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint to continue from: ``auto`` = newest complete one of ``run_dir``, else a path."""
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            raise AlignctlError(
                f"resume=auto: no complete checkpoint in {run_dir / CHECKPOINT_DIR}; set run.output_dir to "
                "the run to continue, or start it without resume"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise AlignctlError(f"resume={resume}: not a complete checkpoint folder (no {STATE_FILE} in it)")
    return path
