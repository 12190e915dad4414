"""`drift eval` and `drift compare`: eval runs with a scripted backend, scoring existing
trajectories, the comparison table and plot, bad input."""

from __future__ import annotations

import json

import pytest

from drift import DriftError
from drift.cli import main
from drift.config import build
from drift.eval_tables import correction_bars
from drift.evaluate import CompareConfig, EvalConfig, markdown_table, paired_difference, run_compare, run_eval
from drift.records import Trajectory, write_jsonl
from drift.rollout.protocol import BackendStats, GenOutput
from drift.tasks import Problem

# Responses per turn; the checker is `numeric` (the last number of the response is the answer).
# Mirrors test_metrics.five_problems: P1 right at once, P2 at turn 2, P3 never (unparseable, 7, 7),
# P4 at turn 3 after an unparseable turn 2, P5 never (9, 8, 9).
FIVE = {"P1": ["4"], "P2": ["5", "4"], "P3": ["no idea", "7", "7"], "P4": ["1", "hmm", "4"], "P5": ["9", "8", "9"]}
ALL_FIRST = {p: ["4"] for p in FIVE}


def problems(ids=tuple(FIVE)) -> list[Problem]:
    return [Problem(id=p, question=f"{p}: what is 2 + 2?", answer="4", checker="numeric", extract="number")
            for p in ids]


class ScriptedBackend:
    """Answers from a script: script[prompt_id][turn - 1], or a function of (conv_id, turn)."""

    name = "scripted"

    def __init__(self, script):
        self.script = script
        self.stats = BackendStats()

    def generate(self, requests, params):
        out = []
        for req in requests:
            texts = [self.script(c, req.turn) if callable(self.script) else self.script[c[0]][req.turn - 1]
                     for c in req.conv_ids]
            out.append([GenOutput(text=t, tokens=len(t) + 1, finish_reason="stop") for t in texts])
            self.stats.generated_tokens += sum(len(t) + 1 for t in texts)
        return out

    def release(self, conv_ids):
        pass

    def close(self):
        pass


def eval_run(tmp_path, name, script=FIVE, **kw):
    cfg = EvalConfig(model="scripted", output=str(tmp_path / name), max_turns=3, **kw)
    return run_eval(cfg, problems=problems(), backend=ScriptedBackend(script))


def test_eval_run_writes_metrics(tmp_path):
    m = eval_run(tmp_path, "base")
    d = tmp_path / "base"
    on_disk = json.loads((d / "metrics.json").read_text())
    assert on_disk["succ_at_k"] == pytest.approx([0.2, 0.4, 0.6])
    assert on_disk["cond_acc"] == pytest.approx([1 / 5, 1 / 4, 1 / 3])
    assert on_disk["correction_rate"][1:] == pytest.approx([1 / 3, 0.0])
    assert on_disk["unique_ratio"] == pytest.approx((1 + 1 + 0.5 + 1 + 2 / 3) / 5)
    assert on_disk["mean_turns_to_success"] == pytest.approx(2.0)
    assert on_disk["unparseable_rate"] == pytest.approx(2 / 12)
    # tokens = characters + 1 per turn; characters: 1 + 2 + (7 + 1 + 1) + (1 + 3 + 1) + 3 = 20 over 12 turns
    assert on_disk["total_tokens"] == 20 + 12
    assert on_disk["response_chars"] == pytest.approx(20 / 12)
    assert on_disk["wall_time_s"] is not None and on_disk["wall_time_s"] >= 0
    assert on_disk["config"]["temperature"] == 0.0 and on_disk["config"]["split"] == "test"
    assert on_disk["source"]["model"] == "scripted"
    assert m["succ_at_k"] == on_disk["succ_at_k"]
    assert sorted(p.name for p in (d / "rollout" / "trajectories").iterdir()) == ["shard-00000.jsonl"]
    md = (d / "metrics.md").read_text()
    assert "| base | 5 | 20.0 ± 20.0 | 40.0 ± 24.5 | 60.0 ± 24.5 |" in md
    assert "| 2 | 4 | 1 | 25.0 | 33.3 (3) | 25.0 | 40.0 ± 24.5 |" in md  # the per-turn row of turn 2


def test_eval_is_resumable(tmp_path):
    first = eval_run(tmp_path, "r")
    with pytest.raises(DriftError, match="--resume"):
        eval_run(tmp_path, "r")
    again = eval_run(tmp_path, "r", resume=True)
    assert again["succ_at_k"] == first["succ_at_k"] and again["num_trajectories"] == 5


def test_eval_with_samples_reports_pass_at_k(tmp_path):
    # sample i of problem P1..P5 is right at turn 1 iff i < c(P) with c = 4, 2, 1, 0, 0; otherwise wrong then right
    c = {"P1": 4, "P2": 2, "P3": 1, "P4": 0, "P5": 0}
    m = eval_run(tmp_path, "s", script=lambda conv, turn: "4" if turn > 1 or conv[1] < c[conv[0]] else "3",
                 n=4, temperature=1.0)
    # pass@1 = mean c/4 = 7/20; pass@2: 1, 1 - C(2,2)/C(4,2) = 5/6, 1 - C(3,2)/C(4,2) = 1/2, 0, 0
    # pass@4 = 3/5
    assert m["pass_at_k"] == pytest.approx({"1": 7 / 20, "2": (1 + 5 / 6 + 0.5) / 5, "4": 0.6})
    assert m["succ_at_k"] == pytest.approx([7 / 20, 1.0, 1.0])
    assert "pass@2" in (tmp_path / "s" / "metrics.md").read_text()


def test_score_existing_trajectories(tmp_path):
    eval_run(tmp_path, "gen")
    rollout = tmp_path / "gen" / "rollout"
    for source in (rollout, rollout / "trajectories", rollout / "trajectories" / "shard-00000.jsonl"):
        m = run_eval(EvalConfig(trajectories=str(source), output=str(tmp_path / "scored"), max_turns=3))
        assert m["succ_at_k"] == pytest.approx([0.2, 0.4, 0.6])
        assert m["source"]["trajectories"] == str(source)
    assert m["wall_time_s"] is not None  # a shard of a rollout directory is read with its manifest
    # at a smaller turn limit P4's success at turn 3 does not count
    m2 = run_eval(EvalConfig(trajectories=str(rollout), output=str(tmp_path / "t2"), max_turns=2))
    assert m2["succ_at_k"] == pytest.approx([0.2, 0.4]) and m2["wall_time_s"] is not None


def test_compare_table_and_plot(tmp_path):
    eval_run(tmp_path, "base")
    eval_run(tmp_path, "trained", script=ALL_FIRST)
    png = tmp_path / "plots" / "succ.png"
    text = run_compare(CompareConfig(dirs=[str(tmp_path / "base"), str(tmp_path / "trained")], plot=str(png)))
    assert "| base | 5 | 20.0 ± 20.0 | 40.0 ± 24.5 | 60.0 ± 24.5 |" in text
    # every problem solved at turn 1: se 0; unique ratio 1, 1 turn to success, no unparseable turns, 2 tokens/turn
    assert "| trained | 5 | 100.0 ± 0.0 | 100.0 ± 0.0 | 100.0 ± 0.0 | 1.000 | – | 1.00 | 0.0 | 2.0 |" in text
    # paired difference at k = 3: per-problem [0, 0, 1, 0, 1] -> +40 points, se sqrt(0.3 / 5) = 24.5
    assert "| trained | 3 | +40.0 ± 24.5 | 5 |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots" / "correction.png").exists()  # oracle runs only: no correction plot
    labelled = run_compare(CompareConfig(dirs=[str(tmp_path / "base"), str(tmp_path / "trained")], labels=["A", "B"]))
    assert "| A | 5 |" in labelled and "| B | 5 |" in labelled


def test_paired_difference_and_markdown_table():
    a = {"per_problem": {"x": [0.0, 1.0], "y": [0.0, 0.0]}}
    b = {"per_problem": {"x": [1.0, 1.0], "y": [1.0, 1.0], "z": [1.0, 1.0]}}
    assert paired_difference(a, b, 1) == (1.0, 0.0, 2)
    d, se, n = paired_difference(a, b, 2)
    assert (d, n) == (0.5, 2) and se == pytest.approx(0.5)  # diffs [0, 1]: sd sqrt(0.5), se sqrt(0.5 / 2)
    m = {"max_turns": 1, "num_problems": 1, "succ_at_k": [0.5], "succ_at_k_se": [None], "unique_ratio": None,
         "unique_ratio_multi_turn": None, "mean_turns_to_success": 1.0, "unparseable_rate": 0.25,
         "response_tokens": 7.0}
    m2 = {**m, "max_turns": 2, "succ_at_k": [0.5, 0.75], "succ_at_k_se": [0.1, 0.1]}
    table = markdown_table([m, m2], ["one", "two"])
    assert "| one | 1 | 50.0 | – | – | – | 1.00 | 25.0 | 7.0 |" in table
    assert "| two | 1 | 50.0 ± 10.0 | 75.0 ± 10.0 |" in table


def test_cli_eval_and_compare(tmp_path, capsys):
    eval_run(tmp_path, "gen")
    rollout = tmp_path / "gen" / "rollout"
    assert main(["eval", "--trajectories", str(rollout), "--output", str(tmp_path / "cli"), "--max-turns", "3"]) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["accuracy"] == pytest.approx(0.6)
    png = tmp_path / "cmp.png"
    assert main(["compare", str(tmp_path / "gen"), str(tmp_path / "cli"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| gen | 5 | 20.0 ± 20.0 |" in out and "| cli | 3 | +0.0 ± 0.0 | 5 |" in out
    assert png.is_file()
    assert main(["eval", "--output", str(tmp_path / "x")]) == 2
    assert "exactly one of --model" in capsys.readouterr().err


def test_bad_input(tmp_path):
    with pytest.raises(DriftError, match="exactly one"):
        EvalConfig(model="m", trajectories="t", output="o")
    with pytest.raises(DriftError, match="exactly one"):
        build(EvalConfig, {"output": "o"})
    with pytest.raises(DriftError, match="output"):
        EvalConfig(model="m")
    with pytest.raises(DriftError, match="temperature"):
        EvalConfig(model="m", output="o", n=4)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DriftError, match="empty"):
        run_eval(EvalConfig(trajectories=str(empty), output=str(tmp_path / "e")))
    with pytest.raises(DriftError, match="input not found"):
        run_eval(EvalConfig(trajectories=str(tmp_path / "missing"), output=str(tmp_path / "e")))
    dup = tmp_path / "dup.jsonl"
    t = Trajectory(prompt_id="a", sample_idx=0, messages=[], turns=[], gold="1")
    write_jsonl(dup, [t.to_json(), t.to_json()])
    with pytest.raises(DriftError, match="duplicate"):
        run_eval(EvalConfig(trajectories=str(dup), output=str(tmp_path / "e")))
    with pytest.raises(DriftError, match="no metrics.json"):
        run_compare(CompareConfig(dirs=[str(tmp_path)]))
    with pytest.raises(DriftError, match="labels"):
        run_compare(CompareConfig(dirs=[str(tmp_path)], labels=["a", "b"]))



def test_cli_eval_with_the_hf_backend(tmp_path, tiny_model_dir):
    """The real path: `drift eval --model` on a tiny random model, greedy, held-out arith problems."""
    out = tmp_path / "hf"
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "arith", "--num-problems", "3", "--max-turns", "2",
            "--max-new-tokens", "4", "--output", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_trajectories"] == 3 and m["config"]["split"] == "test" and m["config"]["temperature"] == 0.0
    assert m["attempted"][0] == 3 and 0 < m["response_tokens"] <= 4
    assert m["wall_time_s"] > 0 and m["source"]["model"] == str(tiny_model_dir)
    assert all(p.startswith("arith-") for p in m["per_problem"])


def test_run_eval_returns_and_the_cli_prints(tmp_path, capsys):
    eval_run(tmp_path, "gen")
    assert capsys.readouterr().out == ""  # library functions print nothing (the rollout's table neither)
    assert main(["eval", "--trajectories", str(tmp_path / "gen" / "rollout"), "--output", str(tmp_path / "cli"),
                 "--max-turns", "3"]) == 0
    assert capsys.readouterr().out.startswith("| run | problems | succ@1 | succ@2 | succ@3 |")


def test_eval_refuses_an_unfinished_rollout_unless_asked(tmp_path, capsys):
    eval_run(tmp_path, "gen")
    rollout = tmp_path / "gen" / "rollout"
    manifest = json.loads((rollout / "manifest.json").read_text())
    (rollout / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    capsys.readouterr()
    assert main(["eval", "--trajectories", str(rollout), "--output", str(tmp_path / "e"), "--max-turns", "3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"drift eval: error: {rollout}: the rollout is not complete (manifest status 'running'): finish it with "
        "`drift rollout --resume` and the same settings first, or pass --allow-incomplete to score what is there"]
    assert not (tmp_path / "e" / "metrics.json").exists()
    assert main(["eval", "--trajectories", str(rollout), "--output", str(tmp_path / "e"), "--max-turns", "3",
                 "--allow-incomplete"]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_problems"] == 5


def compare_cli(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_is_a_regular_command(tmp_path, capsys, monkeypatch):
    eval_run(tmp_path, "base")
    eval_run(tmp_path, "trained", script=ALL_FIRST)
    dirs = [str(tmp_path / "base"), str(tmp_path / "trained")]
    monkeypatch.chdir(tmp_path)
    assert main(["-v", "compare", *dirs]) == 0
    out = capsys.readouterr().out
    assert "| trained | 3 | +40.0 ± 24.5 | 5 |" in out and "plot" not in out
    assert not list(tmp_path.glob("*.png"))  # no plot unless --plot
    code, out, _ = compare_cli(capsys, *dirs, "--set", "labels=A,B", "--set", "plot=s.png")
    assert code == 0 and "| B | 3 | +40.0 ± 24.5 | 5 |" in out and out.rstrip().endswith("\nplot: s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(f"dirs = {json.dumps(dirs)}\nlabels = [\"x\", \"y\"]\n")
    code, out, _ = compare_cli(capsys, "--config", str(cfg))
    assert code == 0 and "| y | 3 | +40.0 ± 24.5 | 5 |" in out


def test_compare_plot_writes_exactly_the_path_it_prints(tmp_path, capsys):
    eval_run(tmp_path, "base")
    (tmp_path / "plots").mkdir()
    code, out, _ = compare_cli(capsys, str(tmp_path / "base"), "--plot", str(tmp_path / "plots"))
    assert code == 0 and out.rstrip().endswith(f"\nplot: {tmp_path / 'plots' / 'succ_at_k.png'}")
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["succ_at_k.png"]
    code, _, err = compare_cli(capsys, str(tmp_path / "base"), "--plot", str(tmp_path / "succ"))
    assert code == 2 and err.splitlines() == [
        f"drift compare: error: --plot {tmp_path / 'succ'}: give a .png path or an existing directory"]
    assert not list(tmp_path.glob("succ*"))


def test_compare_checks_the_plot_path_before_any_work(tmp_path, capsys):
    eval_run(tmp_path, "base")
    capsys.readouterr()
    (tmp_path / "afile").write_text("")
    code, out, err = compare_cli(capsys, str(tmp_path / "base"), "--plot", str(tmp_path / "afile" / "p.png"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"drift compare: error: cannot write to {tmp_path / 'afile'}")


def test_compare_refuses_metrics_from_a_newer_drift(tmp_path, capsys):
    eval_run(tmp_path, "base")
    metrics = tmp_path / "base" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "schema_version": 99}))
    capsys.readouterr()
    code, _, err = compare_cli(capsys, str(tmp_path / "base"))
    assert code == 2 and err.splitlines() == [
        f"drift compare: error: {metrics}: written with schema_version 99, but this drift reads up to 1: "
        "upgrade drift to read it"]


# --- protocols: no oracle, planted answers; the enumeration baseline --------------------------

SECOND = {"P1": ["4", "5", "4"], "P2": ["5", "4", "4"], "P3": ["no idea", "7", "7"], "P4": ["4", "4", "4"],
          "P5": ["9", "4", "4"]}


def test_no_oracle_eval_asks_again_after_right_answers(tmp_path):
    m = eval_run(tmp_path, "no", script=SECOND, protocol="no-oracle")
    assert m["config"]["oracle"] is False and m["protocol"] == "no-oracle"
    s = m["second_attempt"]
    # turn 1 right: P1, P4; turn 2 right: P2, P4, P5; P2 and P5 wrong -> right, P1 right -> wrong
    assert (s["acc_t1"], s["acc_t2"], s["delta"]) == pytest.approx((0.4, 0.6, 0.2))
    assert (s["delta_i_to_c"], s["delta_c_to_i"], s["i_to_c"], s["c_to_i"]) == pytest.approx((0.4, 0.2, 2, 1))
    rows = [json.loads(line) for line in (tmp_path / "no" / "rollout" / "trajectories" / "shard-00000.jsonl").open()]
    assert all(len(r["turns"]) == 3 for r in rows)  # max_turns 3: every conversation runs every turn
    assert {m["content"] for r in rows for m in r["messages"][2:] if m["role"] == "user"} == \
        {"Please check your answer and answer again."}
    md = (tmp_path / "no" / "metrics.md").read_text()
    assert "| no | 5 | 40.0 [11.8, 76.9] | 60.0 [23.1, 88.2] |" in md
    eval_run(tmp_path, "oracle")
    mixed = run_compare(CompareConfig(dirs=[str(tmp_path / "oracle"), str(tmp_path / "no")]))
    assert "Paired difference in succ@T" not in mixed  # succ@k under another protocol is another measure
    assert "### no oracle" in mixed and "### oracle feedback" in mixed
    with pytest.raises(DriftError, match="--protocol no-oracle"):
        EvalConfig(model="m", output=str(tmp_path / "x"), oracle=False)


def test_planted_answers_from_a_file(tmp_path):
    f = tmp_path / "planted.jsonl"
    write_jsonl(f, [{"prompt_id": p, "response": "It is 3."} for p in ("P1", "P2", "P3", "P4")])  # P5: none
    turn2 = {"P1": "4", "P2": "3", "P3": "7", "P4": "4"}
    m = eval_run(tmp_path, "pl", script=lambda conv, turn: turn2[conv[0]] if turn == 2 else "9",
                 protocol="planted", planted=str(f))
    p = m["planted"]
    assert p["conversations"] == 4 and p["without_answer"] == 1 and p["source"] == str(f)
    assert (p["correct_t2"], p["repeat_t2"]) == pytest.approx((0.5, 0.25))
    assert m["succ_at_k"][0] == 0.0 and m["correction_rate"][1] == pytest.approx(0.5)
    assert "| pl | 4 | 50.0 [15.0, 85.0] | 25.0 [4.6, 69.9] |" in (tmp_path / "pl" / "metrics.md").read_text()
    with pytest.raises(DriftError, match="prompt_id and a response"):
        write_jsonl(f, [{"prompt_id": "P1"}])
        eval_run(tmp_path, "bad", protocol="planted", planted=str(f))


def test_planted_answers_sampled_from_the_reference_then_shared(tmp_path):
    # turn 1 of the reference: P1 always right (nothing to plant); others "4", "6", "6" by sample
    def reference(conv, turn):
        return "4" if conv[0] == "P1" or conv[1] == 0 else "6"

    a = eval_run(tmp_path, "a", script=lambda conv, turn: reference(conv, turn) if turn == 1 else "4",
                 protocol="planted", plant_model="scripted", plant_samples=3)
    rows = [json.loads(line) for line in (tmp_path / "a" / "planted.jsonl").open()]
    assert rows == [{"prompt_id": p, "response": "6", "answer_norm": "6", "times": 2, "samples": 3}
                    for p in ("P2", "P3", "P4", "P5")]
    assert a["planted"]["without_answer"] == 1 and a["planted"]["correct_t2"] == 1.0
    # a second model sees the same planted answers (the first eval's directory), and repeats them
    b = eval_run(tmp_path, "b", script=lambda conv, turn: "6", protocol="planted", planted=str(tmp_path / "a"))
    assert b["planted"]["repeat_t2"] == 1.0 and b["planted"]["correct_t2"] == 0.0
    png = tmp_path / "plots" / "succ.png"
    text = run_compare(CompareConfig(dirs=[str(tmp_path / "a"), str(tmp_path / "b")], plot=str(png)))
    # paired on 4 problems: a fixed all four, b none: -100 points, 0 / 4 discordant, McNemar 2 / 2^4
    assert "| b | 4 | -100.0 ± 0.0 | 0 / 4 | 0.12 |" in text
    assert (tmp_path / "plots" / "correction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.endswith(f"correction plot: {tmp_path / 'plots' / 'correction.png'}\n")
    assert correction_bars([a, b], ["a", "b"])[:2] == [("a", "planted: correct at turn 2", 1.0, a["planted"]["correct_t2_ci"]),
                                                      ("a", "planted: repeats it", 0.0, a["planted"]["repeat_t2_ci"])]


def test_multiple_choice_evals_carry_the_enumeration_baseline(tmp_path):
    from drift.tasks import TaskSpec, load_tasks

    mc = load_tasks(TaskSpec(tasks="mc-arith", num_problems=3, split="test"))
    cfg = EvalConfig(model="scripted", output=str(tmp_path / "mc"), max_turns=3)
    m = run_eval(cfg, problems=mc, backend=ScriptedBackend(lambda conv, turn: "<answer>A</answer>"))
    assert m["enumeration_baseline"] == [0.25, 0.5, 0.75]
    assert "enumeration succ@T" in (tmp_path / "mc" / "metrics.md").read_text()
    assert "enumeration_baseline" not in eval_run(tmp_path, "numeric")
