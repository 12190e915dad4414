"""A rollout directory on disk: trajectory shards written and fsynced as conversations end, the
scan a resumed run starts from, and the checks that a directory may be resumed and is complete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from drift import DriftError
from drift.records import Trajectory, json_line, read_jsonl
from drift.rollout.config import RolloutConfig
from drift.rollout.protocol import ConvId
from drift.rundir import RolloutDir, damaged, file_record, mismatch, read_record
from drift.tasks import Problem

log = logging.getLogger(__name__)

SHARD_FILES = "shard-*.jsonl"  # every shard of a rollout directory: the local writer's and each Ray actor's


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    return read_record(RolloutDir(Path(directory)).manifest)


def is_complete(directory: str | Path) -> bool:
    """Did a rollout finish in `directory` (every expected trajectory written or counted as skipped)?"""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("stage") == "rollout" and manifest.get("status") == "complete"


class ShardWriter:
    """Appends trajectories to `<prefix>-NNNNN.jsonl` files of `shard_size` lines; every write is flushed and fsynced.

    After a resume it continues its last shard on disk (whose torn tail `scan_shards` removed).
    Writers side by side (the Ray actors of `drift.rollout.ray_exec`) each have a prefix of their own.
    """

    def __init__(self, directory: Path, shard_size: int, prefix: str = "shard"):
        self.directory, self.shard_size, self.prefix = directory, shard_size, prefix
        directory.mkdir(parents=True, exist_ok=True)
        shards = sorted(directory.glob(f"{prefix}-[0-9]*.jsonl"))
        self.index = int(shards[-1].stem.rsplit("-", 1)[1]) if shards else 0
        self.count = sum(1 for _ in read_jsonl(shards[-1])) if shards else 0
        self._file = None

    def write(self, trajectories: list[Trajectory]) -> None:
        for t in trajectories:
            if self._file is None or self.count >= self.shard_size:
                self._open_next()
            self._file.write(json_line(t.to_json()) + "\n")
            self.count += 1
        if trajectories:
            self._sync()

    def _open_next(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
        if self.count >= self.shard_size:
            self.index, self.count = self.index + 1, 0
        self._file = (self.directory / f"{self.prefix}-{self.index:05d}.jsonl").open("a", encoding="utf-8")

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None


def has_shards(directory: Path) -> bool:
    """Has any trajectory shard been written into `directory`?"""
    return any(directory.glob(SHARD_FILES))


def scan_shards(directory: Path, pattern: str = SHARD_FILES) -> set[ConvId]:
    """Keys of the trajectories on disk (in the files matching `pattern`). A torn last line (a write
    cut by a kill) is cut off the file."""
    done: set[ConvId] = set()
    for path in sorted(directory.glob(pattern)):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(data) - end)
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for lineno, row in read_jsonl(path):
            try:
                key = (str(row["prompt_id"]), int(row["sample_idx"]))
            except (KeyError, TypeError, ValueError):
                raise DriftError(f"{path}:{lineno}: not a trajectory record") from None
            if key in done:
                raise DriftError(f"{path}:{lineno}: duplicate trajectory (prompt_id={key[0]!r}, sample_idx={key[1]})")
            done.add(key)
    return done


def check_run_dir(out: RolloutDir, cfg: RolloutConfig, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the run to resume (None: a fresh run). Refuses to mix runs."""
    if not (out.path.is_dir() and any(p.name != ".drift.lock" for p in out.path.iterdir())):
        return None
    if not cfg.resume:
        raise DriftError(f"output directory {out.path} is not empty: pass --resume to complete that run, "
                         "or choose another --output")
    manifest = read_manifest(out.path)
    if manifest is None or manifest.get("stage") != "rollout":
        raise DriftError(f"cannot resume {out.path}: it is not a rollout directory (no {out.manifest.name})")
    differ = mismatch(manifest, expected)
    if differ:
        raise DriftError(f"cannot resume {out.path}: the run on disk was made with other settings ({'; '.join(differ)})")
    return manifest


def shard_record(out: RolloutDir) -> dict[str, dict[str, Any]]:
    """The size and sha256 of every shard: what a finished rollout's manifest vouches for (`files`)."""
    return file_record(out.path, sorted(out.shards.glob(SHARD_FILES)))


def drop_damaged(out: RolloutDir, manifest: dict[str, Any] | None) -> None:
    """Remove the shards of a finished rollout that are no longer the ones its manifest vouches
    for (truncated, edited, gone), so that resuming samples their conversations again."""
    if not manifest or manifest.get("status") != "complete" or not (harm := damaged(out.path, manifest)):
        return
    log.warning("%s: complete, but its files are damaged (%s): sampling their conversations again", out.path,
                "; ".join(harm))
    for name, want in manifest["files"].items():
        if damaged(out.path, {"files": {name: want}}):
            (out.path / name).unlink(missing_ok=True)


def check_complete(trajectories: list[Trajectory], problems: list[Problem], n: int, skipped: list[dict]) -> None:
    """Every expected (prompt_id, sample_idx) exactly once on disk, or skipped; nothing else."""
    expected = {(p.id, i) for p in problems for i in range(n)}
    seen: set[ConvId] = set()
    for t in trajectories:
        if t.key in seen:
            raise RuntimeError(f"duplicate trajectory {t.key} in the shards")
        seen.add(t.key)
    missing = expected - seen - {(s["prompt_id"], s["sample_idx"]) for s in skipped}
    extra = seen - expected
    if missing or extra:
        raise RuntimeError(f"shards do not match the run: {len(missing)} missing, {len(extra)} unexpected")
