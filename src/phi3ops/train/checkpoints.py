"""Checkpoints that are either complete and intact, or ignored.

The trainer writes a checkpoint file by file; a process killed halfway leaves a directory that
looks like a checkpoint but is not one. After the trainer has written everything, a marker with
the sha256 of every file is written last (atomically). Resume takes the newest checkpoint with a
marker, and verifies every hash before the trainer opens (and unpickles) anything in it: a file
changed, added or removed since the marker was written is refused.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from phi3ops.config import file_sha256, write_json_atomic
from phi3ops.errors import Phi3opsError

log = logging.getLogger(__name__)
MARKER = "phi3ops-complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(Phi3opsError, RuntimeError):
    """A checkpoint's files do not match its marker: it was changed after it was written."""


def _files(checkpoint: Path) -> list[str]:
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                  if p.is_file() and p.name != MARKER)


def mark_complete(checkpoint: Path) -> None:
    """Record the sha256 of every file; the rename makes the marker appear whole or not at all."""
    hashes = {name: file_sha256(checkpoint / name) for name in _files(checkpoint)}
    write_json_atomic(checkpoint / MARKER, {"files": hashes})


def verify(checkpoint: Path) -> None:
    """Raise CheckpointError unless the files are exactly those the marker lists, unchanged."""
    recorded = json.loads((checkpoint / MARKER).read_text())["files"]
    present = _files(checkpoint)
    problems = [f"{name}: added after the checkpoint was written"
                for name in present if name not in recorded]
    problems += [f"{name}: missing" for name in recorded if name not in present]
    problems += [f"{name}: sha256 differs from the marker" for name in recorded
                 if name in present and file_sha256(checkpoint / name) != recorded[name]]
    if problems:
        raise CheckpointError(
            f"{checkpoint}: refusing to resume from a checkpoint that changed after it was "
            f"written ({'; '.join(problems)}). Nothing in it was loaded. Delete the directory to "
            "fall back to the previous checkpoint, or the run directory to start over.")


def checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, newest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, key=lambda item: item[0], reverse=True)


def latest_complete(checkpoint_dir: Path) -> Path | None:
    """The newest verified checkpoint; incomplete ones (no marker) are deleted on the way."""
    for step, path in checkpoints(checkpoint_dir):
        if not (path / MARKER).is_file():
            log.warning("checkpoint-%d has no completion marker (interrupted while saving); "
                        "removing it", step)
            shutil.rmtree(path, ignore_errors=True)
            continue
        verify(path)
        return path
    return None


class MarkCompleteCallback(TrainerCallback):
    """Runs after the trainer has saved model, optimizer, scheduler, RNG and trainer state."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # the ranks that wrote it: rank 0, or each node's first
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
