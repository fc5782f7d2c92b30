"""Checkpoints that are complete or absent: atomic file writes and a completion marker.

transformers writes a checkpoint's files one by one straight into ``checkpoint-N`` and its
``get_last_checkpoint`` takes the highest step, so a run killed while saving would resume from a half-written
folder. The trainer writes `COMPLETE_FILE` into a checkpoint once every process has written all of its files,
deletes older checkpoints (``save_total_limit``) only after that, and resumes (``resume_from_checkpoint=True``)
from the latest checkpoint that carries the marker.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

COMPLETE_FILE = "checkpoint_complete.json"


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then rename the file onto ``path``: readers see the old file or the whole new
    one, never a part (a rename within one folder is atomic). A failed or killed write leaves a stray ``.tmp-*``."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(staging))
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Record that every file of the checkpoint in ``folder`` has been written."""
    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump({"global_step": step}, handle)

    write_atomically(Path(folder) / COMPLETE_FILE, write)


def clear_complete(folder: str | os.PathLike) -> None:
    """Before a checkpoint folder is written (again: a save at a step saved before, or one interrupted): withdraw
    its marker and remove the temporary files an interrupted `write_atomically` left."""
    folder = Path(folder)
    (folder / COMPLETE_FILE).unlink(missing_ok=True)
    if folder.is_dir():
        for stray in folder.glob(".*.tmp-*"):
            stray.unlink(missing_ok=True)


def is_complete(folder: str | os.PathLike) -> bool:
    try:
        return "global_step" in json.loads(Path(folder, COMPLETE_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The latest ``checkpoint-N`` in ``output_dir`` whose save finished; warns naming any later, interrupted ones,
    and fails when there is none."""
    folders = sort_checkpoints(str(output_dir), PREFIX_CHECKPOINT_DIR) if os.path.isdir(output_dir) else []
    complete = [f for f in folders if is_complete(f)]
    if not complete:
        found = f"the checkpoints {[os.path.basename(f) for f in folders]} are incomplete" if folders else \
            "there is no checkpoint"
        raise ValueError(
            f"resume_from_checkpoint=True: {found} in {output_dir} (a complete one holds {COMPLETE_FILE}, written "
            "when its save finished). Pass a checkpoint's path to resume from it anyway, or train without "
            "resume_from_checkpoint."
        )
    skipped = [os.path.basename(f) for f in folders[folders.index(complete[-1]) + 1:]]
    if skipped:
        warnings.warn(
            f"{skipped} in {output_dir} lack {COMPLETE_FILE} (their save was interrupted): resuming from "
            f"{os.path.basename(complete[-1])}, the latest complete checkpoint.", stacklevel=3)
    return complete[-1]


def warn_if_incomplete(checkpoint: str | os.PathLike) -> None:
    """A checkpoint named by its path is loaded as given, with a warning when its save did not finish."""
    if os.path.isdir(checkpoint) and not is_complete(checkpoint):
        warnings.warn(
            f"{checkpoint} lacks {COMPLETE_FILE}: its save may have been interrupted, or it was written by another "
            "trainer. Resuming from it as given; resume_from_checkpoint=True picks the latest complete one.",
            stacklevel=3)
