"""What a training run leaves in its output directory, and how readers know it is finished.

    output/train_summary.json    written twice: {"status": "running", ...} before training starts,
                                 the full summary with "status": "complete" at the end
    output/checkpoint-N/         a resumable checkpoint (save_steps)
      drift_checkpoint.json      its record (`drift.rundir.checkpoint_record`): the settings that
                                 made it and the run's counters so far; written only after the
                                 checkpoint is fully saved, so it also marks the checkpoint complete

A run killed before its end leaves "status": "running" and no model files of an earlier run, so
it can never pass for a finished one: `require_trained` is the check readers make.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.records import write_json
from drift.rundir import (MODEL_FILES, TrainDir, checkpoint_record, damaged, file_record, free_bytes, mib, mismatch,
                          read_record)

log = logging.getLogger(__name__)


def require_trained(path: str | Path) -> None:
    """Refuse a training output whose run did not finish (its summary says status running), or
    whose model files are not the ones its summary vouches for (truncated, replaced, missing).

    A directory without train_summary.json is not drift's (a downloaded model): nothing to check.
    """
    summary = read_record(TrainDir(Path(path)).summary)
    status = (summary or {}).get("status", "complete")  # summaries before status existed were written at the end
    if status != "complete":
        raise DriftError(f"{path}: training did not finish (status {status}); rerun drift train with --output "
                         f"{path} (add --resume-from-checkpoint latest if it saved checkpoints)")
    harm = damaged(path, summary)
    if harm:
        raise DriftError(f"{path}: damaged model: {'; '.join(harm)}; train it again (drift train with --output "
                         f"{path}, or drift run, which redoes a damaged stage)")


def model_files(output: Path) -> dict[str, dict]:
    """The record (`drift.rundir.file_record`) of the model files a finished run saved in `output`."""
    files = [f for p in TrainDir(output).model_files()
             for f in ([p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()])]
    return file_record(output, files)


def start_output(output: Path, running: dict[str, Any], fresh: bool) -> None:
    """Mark `output` as a run in progress before training: the summary says running, and model
    files of an earlier run are removed; so are its checkpoints unless this run resumes from one
    (`fresh` False), so that "latest" can only ever name a checkpoint of this run."""
    write_json(TrainDir(output).summary, running)
    for p in TrainDir(output).model_files(checkpoints=fresh):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def resume_checkpoint(requested: str | None, output: Path,
                      record: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its record (None, None: a fresh run).

    `requested` is a checkpoint directory or "latest" (the newest complete one in `output`). A
    checkpoint without its record (a save cut short) or made with other settings or from other
    data than `record`'s is refused.
    """
    if requested in (None, ""):
        return None, None
    path = latest_checkpoint(output) if requested == "latest" else Path(requested)
    if not path.is_dir():
        raise DriftError(f"checkpoint not found: {path}")
    saved = read_record(checkpoint_record(path))
    if saved is None:
        raise DriftError(f"{path}: incomplete checkpoint (no {checkpoint_record(path).name}: its save was cut short, "
                         "or drift did not write it); resume from an earlier one")
    differ = mismatch(saved, record)
    if differ:
        raise DriftError(f"cannot resume from {path}: it was made with other settings ({'; '.join(differ)}); "
                         "resume with the same settings or train without --resume-from-checkpoint")
    return path, saved


def latest_checkpoint(output: Path) -> Path:
    """The complete checkpoint-N of `output` with the highest N; incomplete newer ones are skipped."""
    for path in TrainDir(output).checkpoints():
        if checkpoint_record(path).is_file():
            return path
        log.warning("train: skipping %s: incomplete (no %s; its save was cut short)", path,
                    checkpoint_record(path).name)
    raise DriftError(f"resume_from_checkpoint=latest: no complete checkpoint-* in {output}")


def space_needed(model: Any, source: str | Path, checkpoints: int, adapter: bool, merged: bool) -> dict[str, int]:
    """Bytes a run writes into its output, by part: the weights save_pretrained writes (only the
    trainable ones for a LoRA `adapter`; the full model again if `merged`), the non-weight files
    of the `source` model directory (tokenizer, config), and per kept checkpoint the weights again
    plus AdamW's two moments of every trainable parameter."""
    params = list(model.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    weights = trainable if adapter else full
    src = Path(source)
    files = sum(f.stat().st_size for f in src.iterdir() if f.is_file() and not _is_weight_file(f)) if src.is_dir() else 0
    return {"model": weights + files + (full + files if merged else 0),
            "checkpoints": checkpoints * (weights + 2 * trainable + files)}


def _is_weight_file(f: Path) -> bool:
    return any(f.match(pattern) for pattern in MODEL_FILES)


def check_space(output: Path, needed: dict[str, int], fresh: bool) -> None:
    """Refuse, before training, an output whose filesystem cannot hold what the run writes (the
    files of an earlier run that `start_output` removes count as free)."""
    replaced = TrainDir(output).model_files(checkpoints=fresh)
    free = free_bytes(output) + sum(_size(p) for p in replaced)
    total = sum(needed.values())
    if total > free:
        parts = f"model {mib(needed['model'])}" + (f", checkpoints {mib(needed['checkpoints'])}"
                                                  if needed["checkpoints"] else "")
        raise DriftError(f"not enough space for {output}: {mib(free)} free, the run writes about {mib(total)} "
                         f"({parts}); free space or choose another output, then rerun")


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
