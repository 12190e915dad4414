"""Compare two `drift run` directories made by two versions of drift from the same config and seed.

    python benchmarks/same_behaviour.py RUN_A RUN_B

For every file both hold, one line: `same bytes`, `same content` (equal once JSON lines are read
as sets, or JSON records without their timings, paths and versions), or `DIFFERS` with what
differs. Trajectories and weighted rows are compared as sets of JSON rows (their order in the
shards follows completion); models by their tensors' bytes. Files only one side has are listed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

# keys of records and summaries that say when, where, how fast or by which version, not what
VOLATILE = {"timings", "cost", "created", "updated", "finished", "started", "versions", "wall_s", "cpu_s", "host",
            "output", "input", "path", "paths", "log", "logs", "elapsed", "seconds", "peak_rss_mb", "throughput",
            "tokens_per_s", "digest", "input_digest", "model_record", "hardware_log", "sessions", "files", "code"}


def scrub(x):
    if isinstance(x, dict):
        return {k: scrub(v) for k, v in x.items() if k not in VOLATILE and not k.endswith(("_s", "_seconds"))}
    if isinstance(x, list):
        return [scrub(v) for v in x]
    return x


def jsonl_set(p: Path) -> list[str]:
    return sorted(json.dumps(scrub(json.loads(line)), sort_keys=True) for line in p.read_text().splitlines() if line)


def tensors(p: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        return {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in f.keys()}


def compare(a: Path, b: Path) -> str:
    if a.read_bytes() == b.read_bytes():
        return "same bytes"
    if a.suffix == ".jsonl":
        x, y = jsonl_set(a), jsonl_set(b)
        return "same content" if x == y else f"DIFFERS ({len(set(x) ^ set(y))} rows differ of {len(x)} / {len(y)})"
    if a.suffix == ".json":
        x, y = scrub(json.loads(a.read_text())), scrub(json.loads(b.read_text()))
        if x == y:
            return "same content"
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)) if isinstance(x, dict) else ["(whole)"]
        return f"DIFFERS in {', '.join(keys[:8])}"
    if a.suffix == ".safetensors":
        x, y = tensors(a), tensors(b)
        same = sum(x.get(k) == v for k, v in y.items())
        return "same tensors" if x == y else f"DIFFERS ({len(y) - same} of {len(y)} tensors)"
    return "DIFFERS (bytes)"


def main(a: str, b: str) -> None:
    ra, rb = Path(a), Path(b)
    skip = ("logs/", "report.md", ".png", "lock", "events.out")
    fa = {p.relative_to(ra).as_posix() for p in ra.rglob("*") if p.is_file()}
    fb = {p.relative_to(rb).as_posix() for p in rb.rglob("*") if p.is_file()}
    for d in sorted({Path(r).parent.as_posix() for r in fa | fb if "/shard-" in r or r.startswith("shard-")}):
        rows = [sorted(r for p in sorted((root / d).glob("shard-*.jsonl")) for r in jsonl_set(p)) for root in (ra, rb)]
        print(f"{d}/shard-*.jsonl: " + ("same content" if rows[0] == rows[1] else
                                        f"DIFFERS ({len(set(rows[0]) ^ set(rows[1]))} rows differ of {len(rows[0])} / {len(rows[1])})"))
    for rel in sorted(fa | fb):
        if any(s in rel for s in skip) or "shard-" in rel:
            continue
        if rel not in fa or rel not in fb:
            print(f"{rel}: only in {a if rel in fa else b}")
            continue
        print(f"{rel}: {compare(ra / rel, rb / rel)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
