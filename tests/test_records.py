"""Records on disk: reading JSONL (bad bytes), writing strict JSON atomically, schema versions, and the
one rule for where a trajectory input's files are."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from drift import DriftError
from drift.records import (Trajectory, read_jsonl, read_trajectories, trajectory_files, write_json,
                           write_jsonl)
from drift.rollout.shards import read_manifest


def strict_json(text: str):
    """Parse as JSON proper: NaN and Infinity are not JSON."""
    def reject(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=reject)


def test_read_jsonl_names_file_and_line_of_bytes_that_are_not_utf8(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"a": 1}\n\n{"b": "\xff"}\n{"c": 3}\n')
    with pytest.raises(DriftError, match=r"t.jsonl:3: not UTF-8 text \(byte 0xff at column 8\)"):
        list(read_jsonl(f))
    assert list(read_jsonl(f, skip_bad=True)) == [(1, {"a": 1}), (3, None), (4, {"c": 3})]


@dataclasses.dataclass
class Stats:
    mean: float
    spread: list


def test_non_finite_floats_are_written_as_null(tmp_path):
    write_json(tmp_path / "d.json", {"a": math.nan, "b": [1.5, math.inf], "c": Stats(-math.inf, [math.nan]),
                                     "d": (2, "x")})
    assert strict_json((tmp_path / "d.json").read_text()) == {"a": None, "b": [1.5, None],
                                                              "c": {"mean": None, "spread": [None]}, "d": [2, "x"]}
    assert write_jsonl(tmp_path / "r.jsonl", [{"w": math.nan}, {"w": 1.0}]) == 2
    assert [strict_json(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [{"w": None}, {"w": 1.0}]


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "r.jsonl"
    write_jsonl(out, [{"ok": 1}])
    with pytest.raises(TypeError):
        write_jsonl(out, [{"ok": 2}, {"bad": object()}])
    with pytest.raises(TypeError):
        write_json(tmp_path / "d.json", {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]
    assert out.read_text() == '{"ok": 1}\n'


def trajectory(pid="p", idx=0, **kw) -> dict:
    return {**Trajectory(prompt_id=pid, sample_idx=idx, messages=[], turns=[], gold="1").to_json(), **kw}


def test_a_trajectory_from_a_newer_drift_is_refused(tmp_path):
    f = tmp_path / "t.jsonl"
    write_jsonl(f, [trajectory(), trajectory(idx=1, schema_version=2)])
    with pytest.raises(DriftError, match=r"t.jsonl:2: written with schema_version 2, but this drift reads up to 1: "
                                         r"upgrade drift"):
        read_trajectories(f)
    with pytest.raises(DriftError, match="schema_version 2"):
        Trajectory.from_json(trajectory(schema_version=2))


def test_a_manifest_from_a_newer_drift_is_refused(tmp_path):
    rollout(tmp_path / "r", schema_version=2)
    with pytest.raises(DriftError, match=r"manifest.json: written with schema_version 2"):
        read_manifest(tmp_path / "r")
    with pytest.raises(DriftError, match=r"manifest.json: written with schema_version 2"):
        trajectory_files(tmp_path / "r")


def rollout(path, status="complete", **manifest):
    """A rollout directory as the engine leaves it: manifest.json + trajectories/shard-*.jsonl."""
    write_json(path / "manifest.json", {"stage": "rollout", "status": status, "schema_version": 1, **manifest})
    write_jsonl(path / "trajectories" / "shard-00000.jsonl", [trajectory(idx=0), trajectory(idx=1)])
    write_jsonl(path / "trajectories" / "shard-00001.jsonl", [trajectory(idx=2)])
    return path


def test_trajectory_files_one_rule(tmp_path):
    run = rollout(tmp_path / "r1")
    shards = [run / "trajectories" / "shard-00000.jsonl", run / "trajectories" / "shard-00001.jsonl"]
    (run / "drift.jsonl").write_text(json.dumps(trajectory(idx=9)) + "\n")  # a weights output beside the rollout
    files, manifest = trajectory_files(run)
    assert files == shards and manifest["status"] == "complete"
    assert trajectory_files(run / "trajectories") == (shards, manifest)
    assert trajectory_files(shards[1]) == ([shards[1]], manifest)  # a shard: its rollout's manifest
    plain = tmp_path / "plain"
    write_jsonl(plain / "b.jsonl", [trajectory()])
    write_jsonl(plain / "a.jsonl", [trajectory()])
    assert trajectory_files(plain) == ([plain / "a.jsonl", plain / "b.jsonl"], None)
    assert trajectory_files(plain / "a.jsonl") == ([plain / "a.jsonl"], None)
    assert [t.sample_idx for t in read_trajectories(run)] == [0, 1, 2]
    with pytest.raises(DriftError, match="input not found"):
        trajectory_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DriftError, match="no .jsonl files"):
        trajectory_files(tmp_path / "empty")
