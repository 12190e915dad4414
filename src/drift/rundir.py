"""Where every stage keeps its output, and the stage record that makes an output honest.

One owner of the layout: the folder and file names below are spelled here and nowhere else.

    <run>/                      a `drift run` directory (RunDir)
      config.json               the run's resolved config (the last one that ran)
      rollout/                  a rollout directory (RolloutDir): manifest.json + trajectories/
      weights/<arm>.jsonl       weighted rows; <arm>.weights.json beside it is their record
      train/<arm>/              a trained model (save_pretrained) + train_summary.json
      train/<arm>/checkpoint-N/ a resumable checkpoint; drift_checkpoint.json in it marks it complete
      online/<arm>/             the online arm (OnlineDir): final model, train_summary.json, state/,
                                iterations/<k>/rollout/, evals/<k>/, adapters/<k>/
      eval/<arm>/               an eval directory (EvalDir): metrics.json, metrics.md, rollout/,
                                and for the planted protocol planted.jsonl, plant-rollout/
      rounds/<arm>/round-<k>/   round k of an offline arm (RoundDir): rollout/, weights.jsonl, union.jsonl/,
                                train/, eval/ (k >= 2); planted-rollout/, planted-weights.jsonl (arms.X.planted)
      logs/<stage>.log          the output of a stage run in a worker process (`jobs > 1`)
      report.md, succ_at_k.png, cost.png

The stage record. Every stage writes, inside its summary file (manifest.json, <stem>.weights.json,
train_summary.json, metrics.json), the same fields:

    stage, status ("running" | "complete"), schema_version,
    settings   the stage config's keys that shape the output (`drift.config.settings`),
    input      the path and digest of the record it consumed (None for a first stage),
    digest     a hash of settings and input digest: what a consumer records as its input,
    cost       the cost ledger (`drift.ledger.Cost`),
    files      (rollout, train, online, weights) the size and sha256 of each file the record
               vouches for, by its path relative to the record's folder (`file_record`).

A reader trusts an output only when its record says complete and its files are as recorded
(`damaged`): `drift run` redoes a stage whose files were truncated or changed, loading a model
that drift trained refuses one, and so do the readers of a rollout's trajectories (`drift
rollout --resume` samples the damaged shards' conversations again); `drift run` compares
settings and input digest before reusing an output.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drift import DriftError
from drift.config import differences, digest, settings

RECORD_SCHEMA = 1
TRAINED = "trained:"  # a model setting that names a training record's digest (`with_model`)
PLOT_FILE = "succ_at_k.png"
CORRECTION_PLOT_FILE = "correction.png"  # beside a succ@k plot, when some run was not oracle-stopped


@dataclass(frozen=True)
class RolloutDir:
    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def shards(self) -> Path:
        return self.path / "trajectories"


@dataclass(frozen=True)
class EvalDir:
    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def table(self) -> Path:
        return self.path / "metrics.md"

    @property
    def rollout(self) -> RolloutDir:
        return RolloutDir(self.path / "rollout")

    @property
    def planted(self) -> Path:
        """The planted first answers of a planted-protocol eval (`drift.planted`)."""
        return self.path / "planted.jsonl"

    @property
    def plant_rollout(self) -> RolloutDir:
        """The reference model's turn-1 samples the planted answers were chosen from."""
        return RolloutDir(self.path / "plant-rollout")


CHECKPOINT = "checkpoint-"
# save_pretrained's weight files (transformers and peft); config and tokenizer files are rewritten anyway
MODEL_FILES = ("model*.safetensors*", "pytorch_model*", "adapter_*", "merged")


@dataclass(frozen=True)
class TrainDir:
    path: Path

    @property
    def summary(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def merged(self) -> Path:
        """The base model with the LoRA adapter merged in (merge_lora)."""
        return self.path / "merged"

    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT}{step}"

    def checkpoints(self) -> list[Path]:
        """The checkpoint-N directories, highest N first (complete or not)."""
        numbered = [p for p in self.path.glob(f"{CHECKPOINT}*")
                    if p.is_dir() and p.name.removeprefix(CHECKPOINT).isdigit()]
        return sorted(numbered, key=lambda p: int(p.name.removeprefix(CHECKPOINT)), reverse=True)

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.checkpoints() if checkpoint_record(p).is_file()]

    def model_files(self, checkpoints: bool = False) -> list[Path]:
        """The weight files a training writes (and, with checkpoints, its checkpoints): what a fresh run clears."""
        patterns = MODEL_FILES + ((f"{CHECKPOINT}*",) if checkpoints else ())
        return [p for pattern in patterns for p in self.path.glob(pattern)]


@dataclass(frozen=True)
class StateDir:
    """One saved state of an online run (`drift.online.state`)."""

    path: Path

    @property
    def policy(self) -> Path:
        return self.path / "policy.pt"

    @property
    def progress(self) -> Path:
        return self.path / "progress.json"


@dataclass(frozen=True)
class OnlineDir:
    """An online run: the final model and its train_summary.json (stage "online"), the resumable
    state, each iteration's rollout, and the held-out evaluations of its learning curve."""

    path: Path

    @property
    def summary(self) -> Path:
        return TrainDir(self.path).summary

    def iteration(self, k: int) -> Path:
        return self.path / "iterations" / f"{k:05d}"

    def iteration_rollout(self, k: int, rank: int, ranks: int) -> Path:
        """The rollout of iteration k sampled by one process (of `ranks`)."""
        return self.iteration(k) / ("rollout" if ranks == 1 else f"rollout-rank{rank}")

    def evaluation(self, k: int) -> Path:
        return self.path / "evals" / f"{k:05d}"

    def adapter(self, k: int) -> Path:
        """The LoRA adapter after iteration k (what a vLLM sampler loads)."""
        return self.path / "adapters" / f"{k:05d}"

    def sync_weights(self, k: int) -> Path:
        """The full weights after iteration k (what a vLLM sampler reloads when the arm trains no adapter)."""
        return self.path / "weights" / f"{k:05d}"

    @property
    def state(self) -> StateDir:
        """The resumable state; written to state.tmp and swapped in through state.old."""
        return StateDir(self.path / "state")

    @property
    def state_tmp(self) -> StateDir:
        return StateDir(self.path / "state.tmp")

    @property
    def state_old(self) -> StateDir:
        return StateDir(self.path / "state.old")


def weights_record(output: str | Path) -> Path:
    """The record (diagnostics) written beside a weighted JSONL file."""
    p = Path(output)
    return p.with_name(p.stem + ".weights.json")


def checkpoint_record(checkpoint: str | Path) -> Path:
    """The record drift train writes into a training checkpoint once it is complete."""
    return Path(checkpoint) / "drift_checkpoint.json"


@dataclass(frozen=True)
class RoundDir:
    """Round k of an iterated offline arm. Round 1 is the arm itself (the shared rollout, its
    weights and training); round k >= 2 keeps its own rollout (sampled from round k-1's model),
    weights (and, training on all rounds' data, their union) and model. Every round but the
    last is evaluated here; the last is the arm's model, evaluated in eval/<arm>."""

    run: RunDir
    arm: str
    k: int

    @property
    def path(self) -> Path:
        return self.run.root / "rounds" / self.arm / f"round-{self.k}"

    @property
    def rollout(self) -> RolloutDir:
        return self.run.rollout if self.k == 1 else RolloutDir(self.path / "rollout")

    @property
    def weights(self) -> Path:
        return self.run.weights(self.arm) if self.k == 1 else self.path / "weights.jsonl"

    @property
    def union(self) -> Path:
        return self.path / "union.jsonl"

    @property
    def planted_rollout(self) -> RolloutDir:
        """Correction contexts: continuations of the round's own most frequent wrong first answers."""
        return RolloutDir(self.path / "planted-rollout")

    @property
    def planted_weights(self) -> Path:
        return self.path / "planted-weights.jsonl"

    @property
    def train(self) -> TrainDir:
        return self.run.train(self.arm) if self.k == 1 else TrainDir(self.path / "train")

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.path / "eval")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def rollout(self) -> RolloutDir:
        return RolloutDir(self.root / "rollout")

    def weights(self, arm: str) -> Path:
        return self.root / "weights" / f"{arm}.jsonl"

    def train(self, arm: str) -> TrainDir:
        return TrainDir(self.root / "train" / arm)

    def online(self, arm: str) -> OnlineDir:
        return OnlineDir(self.root / "online" / arm)

    def eval(self, arm: str) -> EvalDir:
        return EvalDir(self.root / "eval" / arm)

    def round(self, arm: str, k: int) -> RoundDir:
        return RoundDir(self, arm, k)

    def evaluated(self) -> list[str]:
        """The arms that have an eval directory, by name."""
        folder = self.root / "eval"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def log(self, step: str) -> Path:
        """The log file of a step run in a worker process (`jobs > 1`): "train/drift" -> logs/train-drift.log."""
        return self.root / "logs" / f"{step.replace('/', '-')}.log"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plot(self) -> Path:
        return self.root / PLOT_FILE

    @property
    def cost_plot(self) -> Path:
        return self.root / "cost.png"

    def stage_dirs(self, stage: str) -> list[Path]:
        """What `--from STAGE` removes for one stage of the pipeline: online arms train; a round
        after the first depends on the first round's training, so redoing rollouts, weights or
        training redoes every later round; redoing evaluations redoes the rounds' evaluations."""
        if stage == "eval":
            return [self.root / "eval", *sorted((self.root / "rounds").glob("*/round-*/eval"))]
        return [self.root / stage, self.root / "rounds"] + ([self.root / "online"] if stage == "train" else [])


# --- stage records -------------------------------------------------------------------------


def record(stage: str, settings: dict[str, Any], input_record: dict[str, Any] | None = None,
           input_path: str | Path | None = None, status: str = "running") -> dict[str, Any]:
    """The record fields of a stage's summary (see the module docstring)."""
    source = None if input_record is None else {"path": str(input_path), "digest": input_record.get("digest")}
    return {"stage": stage, "status": status, "schema_version": RECORD_SCHEMA, "settings": settings,
            "input": source, "digest": digest({"settings": settings, "input": source and source["digest"]})}


def config_record(stage: str, cfg: Any, input_record: dict[str, Any] | None, input_path: str | Path | None, *,
                  model_record: dict[str, Any] | None = None, **resolved: Any) -> dict[str, Any]:
    """The record of a stage run with config `cfg`: its settings (`drift.config.settings`) with the
    values resolved at run time (`resolved`: what dtype `auto` became, the problems' fingerprint),
    a starting model that drift trained named by its training record (`model_record`, `with_model`),
    and the record it consumed (`input_record`, read from `input_path`)."""
    return record(stage, with_model({**settings(cfg), **resolved}, model_record), input_record, input_path)


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A summary file's JSON (None if it does not exist); a newer schema or bad JSON is an error."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DriftError(f"{p}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise DriftError(f"{p}: not a drift summary file")
    check_schema(data.get("schema_version", 1), p)
    return data


def check_schema(version: Any, where: Any, supported: int = RECORD_SCHEMA) -> None:
    if not isinstance(version, int) or version > supported:
        raise DriftError(f"{where}: written with schema_version {version!r}, but this drift reads up to "
                         f"{supported}: upgrade drift to read it")


def file_record(folder: str | Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """{path relative to `folder`: {"bytes", "sha256"}} of `files`: what a record vouches for."""
    root = Path(folder)
    return {str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(files)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def damaged(folder: str | Path, rec: dict[str, Any] | None) -> list[str]:
    """How the files a record vouches for (`files`, relative to `folder`) differ from what it
    recorded: missing, another size (truncated), or another digest. Empty: all intact (or the
    record vouches for no files)."""
    out = []
    for name, want in ((rec or {}).get("files") or {}).items():
        f = Path(folder) / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif (size := f.stat().st_size) != want["bytes"]:
            out.append(f"{name} has {size} bytes, its record says {want['bytes']} (truncated or replaced)")
        elif _sha256(f) != want["sha256"]:
            out.append(f"{name} differs from the file its record vouches for (sha256)")
    return out


def is_complete(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") == "complete"


@dataclass(frozen=True)
class Mismatch:
    """One way a stored record differs from the one a rerun would write.

    kind: "setting" (one of the stage's own settings), "model" (it started from another trained
    model: an earlier stage was redone) or "input" (it was made from another input: likewise).
    """

    kind: Literal["setting", "model", "input"]
    text: str

    def __str__(self) -> str:
        return self.text


def mismatches(rec: dict[str, Any], new: dict[str, Any]) -> list[Mismatch]:
    """How a stored record differs from the one a rerun would write (settings, then input)."""
    old_s, new_s = rec.get("settings") or {}, new["settings"]
    out = []
    for key in sorted(set(old_s) | set(new_s)):
        was = old_s.get(key)
        kind = "model" if key == "model" and isinstance(was, str) and was.startswith(TRAINED) else "setting"
        a, b = ({key: s[key]} if key in s else {} for s in (old_s, new_s))
        out += [Mismatch(kind, text) for text in differences(a, b)]
    old_in, new_in = (rec.get("input") or {}).get("digest"), (new.get("input") or {}).get("digest")
    if old_in != new_in:
        out.append(Mismatch("input", f"input: made from {old_in or 'another input'}, now {new_in or 'another input'} "
                                     "(an earlier stage was redone)"))
    return out


def mismatch(rec: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`mismatches` as text, for a stage's own refusal to resume."""
    return [m.text for m in mismatches(rec, new)]


# --- output directories ------------------------------------------------------------------


def ensure_writable(path: str | Path, is_file: bool = False) -> Path:
    """Create the output directory (or a file's parent) and prove it is writable, before any work."""
    p = Path(path)
    target = p.parent if is_file else p
    if is_file and p.is_dir():
        raise DriftError(f"output {p} is a directory; give a file path")
    if not is_file and p.exists() and not p.is_dir():
        raise DriftError(f"output {p} exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".drift-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if is_space_error(e):
            raise space_error(target) from None
        raise DriftError(f"cannot write to {target}: {e.strerror or e}") from None
    return p


SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem holding `path` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def space_error(path: str | Path, needed: int | None = None, rerun: str = "rerun the same command") -> DriftError:
    """The one line for a full disk at `path`: what is free, what was needed (when known), and
    that nothing written is lost, so the same command resumes once space is freed."""
    want = f", about {mib(needed)} needed" if needed else ""
    return DriftError(f"no space left on device writing {path} ({mib(free_bytes(path))} free{want}); what is "
                      f"already written is kept: free space (or choose another output) and {rerun}")


# torch.save's zip writer after a short write (the stream's error, then the writer's as it closes)
TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "iostream error")


def is_space_error(e: BaseException, path: str | Path | None = None, needed: int = 0) -> bool:
    """A full disk or quota. safetensors' writer reports one as its own error type without an
    errno, naming the OS error number in its message; torch.save's (a checkpoint's optimizer
    state) as a RuntimeError naming neither, only that a write came up short: given the `path`
    written, such a failure counts when its filesystem now has less free than the `needed`
    bytes (at least 1 MiB)."""
    if isinstance(e, OSError):
        return e.errno in SPACE_ERRORS
    if any(f"(os error {n})" in str(e) for n in SPACE_ERRORS):
        return True
    return (path is not None and isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_FAILURES)
            and free_bytes(path) < max(needed, 2**20))


class Lock:
    """An exclusive lock on an output (a directory, or a file's lock beside it) for one writer.

    A second drift process writing the same output gets one clear error; the lock goes away with
    the process, however it ends (flock).
    """

    def __init__(self, path: str | Path, is_file: bool = False):
        p = Path(path)
        self.path = p.with_name(f".{p.name}.lock") if is_file else p / ".drift.lock"
        self._fd: int | None = None

    def __enter__(self) -> Lock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise (space_error(self.path) if is_space_error(e) else
                   DriftError(f"cannot write to {self.path.parent}: {e.strerror or e}")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DriftError(f"{self.path.parent} is being written by another drift process (pid {holder}); "
                                 "wait for it to finish or choose another output") from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            os.close(fd)
            raise (space_error(self.path) if is_space_error(e) else
                   DriftError(f"cannot write to {self.path}: {e.strerror or e}")) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def trained_record(model: str | None) -> dict[str, Any] | None:
    """The training record of a model directory that drift trained (None for any other model)."""
    if not model:
        return None
    p = Path(model).expanduser()
    return read_record(TrainDir(p).summary) if p.is_dir() else None


def with_model(settings: dict[str, Any], model_record: dict[str, Any] | None) -> dict[str, Any]:
    """A model drift trained is identified by its training record, not by the path it lies at."""
    if model_record is None:
        return settings
    return {**settings, "model": f"{TRAINED}{model_record.get('digest')}"}
