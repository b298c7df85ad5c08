"""Checkpoints that are either complete or absent.

A checkpoint is written into a hidden temporary folder beside its final place and renamed into
place only once every file is on disk, so a crash mid-save never leaves a folder named
``step-N`` that resume could pick up. Old checkpoints are pruned only after the new one is
complete. Which checkpoint a resume uses is decided in ``alignctl.run_dir``.
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
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:07d}"


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, fsync what it wrote, then rename tmp_dir to ``final``.

    An existing ``final`` (the same step saved again) is renamed aside first and deleted only once
    the new folder is in place, so a complete copy exists at every moment."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
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


def remove_leftovers(run_dir: Path) -> List[str]:
    """Clean up after saves killed midway: delete ``.tmp-*`` folders; put back a ``.old-*`` folder
    whose replacement never arrived (else delete it). Returns what was done, for the console."""
    done = []
    for parent in (run_dir, run_dir / CHECKPOINT_DIR):
        if not parent.is_dir():
            continue
        for child in sorted(parent.iterdir()):
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
                done.append(f"removed {child} (left by an interrupted save)")
            elif child.name.startswith(OLD_PREFIX):
                original = parent / child.name[len(OLD_PREFIX):].rpartition("-")[0]
                if original.exists():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    os.replace(child, original)
                    done.append(f"restored {original} (its re-save was interrupted)")
    return done


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], state: dict, keep: Optional[int]) -> Path:
    """Write checkpoint ``step`` (files by ``write``, plus ``state`` as JSON); prune to ``keep``.

    trainer_state.json also lists every file with its size, so a truncated or missing file is
    found before a resume relies on it (``checkpoint_problem``)."""

    def write_all(folder: Path) -> None:
        write(folder)
        files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
        record = {"step": step, **state, "files": files}
        (folder / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

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


def step_folders(run_dir: Path) -> List[Path]:
    """Every ``step-N`` folder of the run, complete or not, newest first."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in folder.iterdir() if (m := _NAME.match(child.name)) and child.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def read_state(folder: Path) -> dict:
    """trainer_state.json of a checkpoint (call ``checkpoint_problem`` first)."""
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be resumed from (None when it looks complete): no or broken
    trainer_state.json, or a listed file that is missing or has another size (truncated)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return f"incomplete (no {STATE_FILE})"
    try:
        state = read_state(folder)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{STATE_FILE} cannot be read ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} is not a checkpoint state (no step)"
    if "progress" not in state:
        return (
            "it holds model weights only (saved under launcher=fsdp or deepspeed, whose sharded optimizer state "
            f"alignctl does not resume yet); start a new run from them with model.name_or_path={folder / 'model'}"
        )
    for name, size in (state.get("files") or {}).items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is truncated or damaged ({file.stat().st_size} bytes, {size} when saved)"
    return None


class UnreadableCheckpoint(AlignctlError):
    """A checkpoint file could not be loaded (resume=auto falls back to an older checkpoint)."""
