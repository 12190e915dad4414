"""Probe drift as a new user would, and print what happened (the tables of docs/reliability.md).

    HF_HUB_OFFLINE=1 python docs/probes.py [--workdir DIR]

Every probe runs the real CLI (`python -m drift.cli ...`) in a fresh directory, on a tiny random
model built here (the tests' byte tokenizer and 2-layer Llama), and records the exit status and
the last line drift printed. Four kinds:
  1. bad input to every command: one clear line (exit 2) and nothing written is lost;
  2. SIGKILL inside each stage of `drift run`, then the same command again: it resumes;
  3. the same `drift run` with one setting changed: it refuses to reuse the old output;
  4. untruthful checkers and Unicode (through planted answers), a full disk (a small tmpfs: needs
     root, else skipped), damaged outputs, settings the online arm shares with other stages,
     surprising defaults, and exact resumes.
`--only bad|killed|changed|seams` runs one kind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def tiny_model(directory: Path) -> Path:
    from conftest import make_tokenizer, save_tiny_model

    return save_tiny_model(directory, make_tokenizer("chatml"))


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def drift(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drift.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
    if p.returncode == 0:
        return "ok"
    tail = lines[-1] if lines else "(nothing)"
    return tail if len(tail) < 240 else tail[:237] + "..."


def run_config(model: Path, output: Path, **over: dict) -> dict:
    data = {"output": str(output), "model": str(model),
            "rollout": {"tasks": "mc-arith", "split": "train", "num_problems": 4, "n": 4, "max_turns": 2,
                        "max_new_tokens": 6, "batch_size": 8},
            "train": {"epochs": 20, "batch_size": 2, "lr": 1e-4, "save_steps": 2, "logging_steps": 1},
            "eval": {"tasks": "mc-arith", "split": "test", "num_problems": 4, "max_turns": 2, "max_new_tokens": 6},
            "arms": {"drift": {"method": "drift", "rounds": 2, "train": {"min_weight": 0.0}},
                     "grpo": {"method": "online", "online": {"iterations": 3, "batch_prompts": 2, "eval_every": 1,
                                                             "lr": 1e-3}}}}
    data.update(over)
    return data


def bad_inputs(work: Path, model: Path) -> list[tuple[str, str, int, str]]:
    good = work / "tasks.jsonl"
    good.write_text('{"id": "a", "question": "2+2?", "answer": "4"}\n')
    empty = work / "empty.jsonl"
    empty.write_text("")
    binary = work / "latin1.jsonl"
    binary.write_bytes(b'{"id": "a", "question": "caf\xe9", "answer": "4"}\n')
    fake = work / "fake.parquet"
    fake.write_text("not parquet")
    wrongtype = work / "wrongtype.jsonl"
    wrongtype.write_text('{"id": "a", "question": ["2+2?"], "answer": {"x": 4}}\n')
    afile = work / "a-file"
    afile.write_text("x")
    nomodel = work / "nomodel"
    nomodel.mkdir()
    weighted = work / "w.jsonl"
    weighted.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}], "weight": 1.0}) + "\n")
    probes = [
        ("rollout", "tasks file missing", ["rollout", "--model", str(model), "--tasks", "nope.jsonl", "--output", "r"]),
        ("rollout", "empty tasks file", ["rollout", "--model", str(model), "--tasks", str(empty), "--output", "r"]),
        ("rollout", "non-UTF-8 tasks file", ["rollout", "--model", str(model), "--tasks", str(binary), "--output", "r"]),
        ("rollout", "a .parquet that is not Parquet", ["rollout", "--model", str(model), "--tasks", str(fake),
                                                        "--output", "r"]),
        ("rollout", "list question, dict answer", ["rollout", "--model", str(model), "--tasks", str(wrongtype),
                                                    "--output", "r"]),
        ("rollout", "directory without a model", ["rollout", "--model", str(nomodel), "--tasks", str(good),
                                                  "--output", "r"]),
        ("rollout", "output path is a file", ["rollout", "--model", str(model), "--tasks", str(good), "--output",
                                              str(afile)]),
        ("rollout", "unknown key", ["rollout", "--set", "temprature=1"]),
        ("weights", "input missing", ["weights", "nope", "--output", "w.jsonl"]),
        ("weights", "beta nan", ["weights", str(good), "--output", "w.jsonl", "--beta", "nan"]),
        ("weights", "beta 'hot'", ["weights", str(good), "--output", "w.jsonl", "--beta", "hot"]),
        ("train", "lr -1", ["train", "--model", str(model), "--data", str(weighted), "--lr", "-1", "--output", "t"]),
        ("train", "max-steps 0", ["train", "--model", str(model), "--data", str(weighted), "--max-steps", "0",
                                  "--output", "t"]),
        ("train", "output path is a file", ["train", "--model", str(model), "--data", str(weighted), "--output",
                                            str(afile)]),
        ("train", "resume latest without checkpoints", ["train", "--model", str(model), "--data", str(weighted),
                                                        "--output", "t2", "--resume-from-checkpoint", "latest"]),
        ("online", "n 1", ["online", "--model", str(model), "--tasks", str(good), "--n", "1", "--output", "o"]),
        ("online", "keep-top 0", ["online", "--model", str(model), "--tasks", str(good), "--keep-top", "0",
                                  "--output", "o"]),
        ("eval", "model and trajectories both missing", ["eval", "--output", "e"]),
        ("compare", "not an eval directory", ["compare", str(work)]),
        ("run", "config file missing", ["run", "nope.toml"]),
        ("inspect", "row out of range", ["inspect", str(weighted), "--model", str(model), "--row", "9"]),
    ]
    out = []
    for command, what, args in probes:
        p = drift(*args, cwd=work)
        out.append((command, what, p.returncode, last_line(p)))
    return out


def killed(work: Path, model: Path) -> list[tuple[str, str, str]]:
    """SIGKILL while a stage is running (its output appears), then the same command."""
    watch: list[tuple[str, Callable[[Path], bool]]] = [
        ("rollout", lambda r: any((r / "rollout/trajectories").glob("shard-*.jsonl"))),
        ("eval/base", lambda r: any((r / "eval/base/rollout/trajectories").glob("shard-*.jsonl"))),
        ("train/drift (after a checkpoint)", lambda r: any((r / "train/drift").glob("checkpoint-*/drift_checkpoint.json"))),
        ("rollout/drift/round-2", lambda r: any((r / "rounds/drift/round-2/rollout/trajectories").glob("shard-*"))),
        ("train/drift/round-2", lambda r: (r / "rounds/drift/round-2/train/train_summary.json").is_file()),
        ("online/grpo (after iteration 1)", lambda r: (r / "online/grpo/state/progress.json").is_file()),
    ]
    out = []
    for name, started in watch:
        run = work / f"kill-{len(out)}"
        cfg = work / f"kill-{len(out)}.json"
        cfg.write_text(json.dumps(run_config(model, run)))
        proc = subprocess.Popen([sys.executable, "-m", "drift.cli", "run", str(cfg)], cwd=work, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not started(run):
            time.sleep(0.02)
        was_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        again = drift("run", str(cfg), cwd=work)
        report = (run / "report.md").is_file()
        outcome = "resumed, report written" if again.returncode == 0 and report else last_line(again)
        out.append((name, "killed mid-stage" if was_running else "finished before the kill", outcome))
    return out


def changed(work: Path, model: Path) -> list[tuple[str, str]]:
    run = work / "changed"
    base = run_config(model, run, arms={"drift": {"method": "drift", "train": {"min_weight": 0.0}}})
    base["train"] = {**base["train"], "epochs": 1, "save_steps": 0}
    cfg = work / "changed.json"
    cfg.write_text(json.dumps(base))
    first = drift("run", str(cfg), cwd=work)
    out = [("(first run)", last_line(first))]
    for what, key, value in [("weights.beta 0.1 -> 0.3", "weights", {"beta": 0.3}),
                             ("train.lr 1e-4 -> 2e-4", "train", {**base["train"], "lr": 2e-4}),
                             ("rollout.n 4 -> 2", "rollout", {**base["rollout"], "n": 2}),
                             ("eval.max_turns 2 -> 3", "eval", {**base["eval"], "max_turns": 3}),
                             ("rollout.batch_size 8 -> 4 (no effect on results)", "rollout",
                              {**base["rollout"], "batch_size": 4})]:
            cfg.write_text(json.dumps({**base, key: value}))
            out.append((what, last_line(drift("run", str(cfg), cwd=work))))
    drift_arm = base["arms"]["drift"]
    for what, arm in [("arms.drift.rounds 1 -> 2", {**drift_arm, "rounds": 2}),
                      ("arms.drift.round_data continue -> union, rounds 1 -> 2",
                       {**drift_arm, "rounds": 2, "round_data": "union"})]:
        cfg.write_text(json.dumps({**base, "arms": {"drift": arm}}))
        out.append((what, last_line(drift("run", str(cfg), cwd=work))))
    cfg.write_text(json.dumps(base))
    model_file = run / "train/drift/model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    p = drift("run", str(cfg), cwd=work)
    said = next((x.split(": ", 1)[-1] for x in p.stderr.splitlines() if "files are damaged" in x), last_line(p))
    out.append(("(none; train/drift/model.safetensors truncated)", said if p.returncode == 0 else last_line(p)))
    return out


CHECKERS = '''def says_yes(answer, gold):
    return "yes"


def false_in_a_list(answer, gold):
    return [False]


def same_text(answer, gold):
    return answer == gold
'''


def seams(work: Path, model: Path) -> list[tuple[str, str, int, str]]:
    """Kind 4: (command, case, exit, what drift said); a warning is quoted instead of "ok"."""
    (work / "probe_checkers.py").write_text(CHECKERS)
    out = []

    def probe(command: str, what: str, *args: str, warning: str | None = None) -> subprocess.CompletedProcess:
        p = drift(*args, cwd=work)
        said = last_line(p)
        if warning and p.returncode == 0:
            said = next((x.split(": ", 1)[-1] for x in p.stderr.splitlines() if warning in x), said)
        out.append((command, what, p.returncode, said))
        return p

    sample = ["--n", "2", "--max-turns", "1", "--max-new-tokens", "4", "--temperature", "1.0"]
    for fn in ("says_yes", "false_in_a_list"):
        tasks = work / f"{fn}.jsonl"
        tasks.write_text(json.dumps({"id": "a", "question": "11 + 4?", "answer": "15", "checker": f"probe_checkers:{fn}",
                                     "extract": "full"}) + "\n")
        probe("rollout", f"custom checker returns {fn}", "rollout", "--model", str(model), "--tasks", str(tasks),
              "--output", f"r-{fn}", *sample)
    # a planted first answer is judged by the task's checker like a model's: one the checker takes as
    # right ends the conversation at once, and eval says so
    for checker, gold, planted, what in [("exact", "caf\u00e9", "cafe\u0301", "exact: gold NFC, answer NFD"),
                                         ("choice", "B", "\uff22", "choice: answer full-width B"),
                                         ("probe_checkers:same_text", "caf\u00e9", "cafe\u0301",
                                          "custom function (==): gold NFC, answer NFD"),
                                         ("exact", "caf\u00e9", "the\u0301", "exact: a wrong answer (control)")]:
        name = f"uni-{len(out)}"
        (work / f"{name}.jsonl").write_text(json.dumps({"id": "u", "question": "Say it.", "answer": gold,
                                                         "checker": checker, "extract": "full"}) + "\n")
        (work / f"{name}-planted.jsonl").write_text(json.dumps({"prompt_id": "u", "response": planted}) + "\n")
        probe("eval", f"planted answer, {what}", "eval", "--model", str(model), "--tasks", str(work / f"{name}.jsonl"),
              "--split", "all", "--protocol", "planted", "--planted", str(work / f"{name}-planted.jsonl"),
              "--max-turns", "2", "--max-new-tokens", "3", "--output", name)
    weighted = work / "seams-w.jsonl"
    weighted.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i} + {i}?"},
                                                         {"role": "assistant", "content": str(2 * i)}],
                                            "weight": 1.0}) + "\n" for i in range(8)))
    train = ["--data", str(weighted), "--batch-size", "2", "--max-steps", "1"]
    disk = work / "small-disk"
    disk.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True).returncode:
        out.append(("train/weights/rollout", "full disk", 0, "(skipped: cannot mount a tmpfs here)"))
    else:
        try:
            probe("train", "128 KiB free, the model needs ~360 KiB", "train", "--model", str(model), *train,
                  "--output", str(disk / "t"))
            subprocess.run(["mount", "-o", "remount,size=256k", str(disk)], check=True)
            small = work / "small-run.json"
            small.write_text(json.dumps(run_config(model, disk / "run", arms={"drift": {"method": "drift"}},
                                                   train={"epochs": 1, "batch_size": 2, "save_steps": 0})))
            probe("run", "256 KiB: room for the rollout, not for training", "run", str(small))
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            probe("run", "the same command after the disk grew", "run", str(small), warning="stage rollout: complete")
            for f in (disk / "run", disk / "t"):
                shutil.rmtree(f, ignore_errors=True)
            subprocess.run(["mount", "-o", "remount,size=128k", str(disk)], check=True)
            with open(disk / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            good = work / "tasks.jsonl"
            probe("rollout", "disk full", "rollout", "--model", str(model), "--tasks", str(good), "--output",
                  str(disk / "r"), *sample)
            probe("weights", "disk full", "weights", str(work / "r-says_yes"), "--output", str(disk / "w.jsonl"))
        finally:
            subprocess.run(["umount", str(disk)], check=False)
    trained = work / "seams-t"
    if probe("train", "(a model to damage)", "train", "--model", str(model), *train, "--output", str(trained)).returncode == 0:
        data = (trained / "model.safetensors").read_bytes()
        (trained / "model.safetensors").write_bytes(data[: len(data) // 2])
        probe("train", "from a model whose model.safetensors was truncated", "train", "--model", str(trained), *train,
              "--output", str(work / "seams-t2"))
        probe("rollout", "a model whose model.safetensors was truncated", "rollout", "--model", str(trained),
              "--tasks", str(work / "tasks.jsonl"), "--output", "r-damaged", *sample)
    rollout = ["rollout", "--model", str(model), "--tasks", str(work / "tasks.jsonl"), "--output", "r-cut", *sample]
    if probe("rollout", "(a rollout to damage)", *rollout).returncode == 0:
        shard = work / "r-cut/trajectories/shard-00000.jsonl"
        shard.write_text("".join(shard.read_text().splitlines(keepends=True)[:-1]))  # cut at a line's end
        probe("weights", "a rollout whose shard lost its last line", "weights", "r-cut", "--output", "cut-w.jsonl")
        probe("eval", "--trajectories of that rollout", "eval", "--trajectories", "r-cut", "--output", "e-cut")
        probe("rollout", "the same command with --resume", *rollout, "--resume", warning="files are damaged")
    online_tasks = work / "online-tasks.jsonl"
    online_tasks.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Say something about {i}.", "answer": "x",
                                                "checker": "online_task:first_char_even", "extract": "full"}) + "\n"
                                    for i in range(40)))
    online = ["online", "--model", str(model), "--tasks", str(online_tasks), "--n", "2", "--batch-prompts", "2",
              "--max-turns", "1", "--max-new-tokens", "3", "--iterations", "1", "--eval-every", "0", "--dtype", "float32"]
    p = probe("online", "default eval (the whole held-out split)", *online, "--output", "o-eval",
              warning="held-out evaluation(s), each of")
    if p.returncode == 0:
        data = (work / "o-eval/model.safetensors").read_bytes()
        (work / "o-eval/model.safetensors").write_bytes(data[: len(data) // 2])
        probe("online", "the same command, its model.safetensors truncated", *online, "--output", "o-eval",
              warning="files are damaged")
    probe("online", "--eval '{\"split\": \"train\"}'", *online, "--output", "o-train-eval",
          '--eval={"split": "train", "num_problems": 2}', warning="score problems the arm trains on")
    for flags in (["--kl", "matched", "--kl-coef", "-1"], ["--kl", "ufo", "--kl-coef", "-1"], ["--gamma", "0"],
                  ["--gamma", "2"], ["--gamma", "-1"], ["--negative-nll-cap", "-1"], ["--max-length", "0"],
                  ["--kl", "matched", "--beta", "0"]):
        probe("online", " ".join(flags), "online", "--model", str(model), "--tasks", "mc-arith", "--output", "o-bad",
              *flags)
    pairs = work / "n2.jsonl"
    pairs.write_text("".join(json.dumps({"prompt_id": f"p{g}", "sample_idx": i, "turn_rewards": {"t1": float(i)}})
                             + "\n" for g in range(3) for i in range(2)))
    probe("weights", "beta auto with n = 2 (ESS/N >= 0.5 > target 0.25)", "weights", str(pairs), "--output",
          "n2-w.jsonl", "--beta", "auto", warning="cannot reach")
    # exact resumes: train_loss over the whole run; weighted rows in canonical order
    resumed = ["train", "--model", str(model), "--data", str(weighted), "--batch-size", "2", "--max-steps", "4",
               "--save-steps", "1", "--save-total-limit", "4", "--output", "loss-t"]
    if drift(*resumed, cwd=work).returncode == 0:
        whole = json.loads((work / "loss-t/train_summary.json").read_text())["train_loss"]
        (work / "loss-t/checkpoint-3/drift_checkpoint.json").unlink()  # killed before checkpoint 3 was whole
        p = drift(*resumed, "--resume-from-checkpoint", "latest", cwd=work)
        again = json.loads((work / "loss-t/train_summary.json").read_text())
        out.append(("train", "--resume-from-checkpoint latest after checkpoint 2 of 4", p.returncode,
                    f"train_loss {again['train_loss']:.6g} (resumed from {Path(again['resumed_from']).name}); "
                    f"uninterrupted {whole:.6g}"))
    ordered = [json.dumps({"prompt_id": f"p{g}", "sample_idx": i, "turn_rewards": {"t1": float((g + i) % 2)}}) + "\n"
               for g in range(3) for i in range(4)]
    (work / "order-a.jsonl").write_text("".join(ordered))
    (work / "order-b.jsonl").write_text("".join(reversed(ordered)))  # completed in another order
    codes = [drift("weights", f"order-{x}.jsonl", "--output", f"order-{x}-w.jsonl", cwd=work).returncode for x in "ab"]
    same = (work / "order-a-w.jsonl").read_bytes() == (work / "order-b-w.jsonl").read_bytes()
    out.append(("weights", "the same rows in reversed order", max(codes),
                "weighted files byte-identical" if same else "weighted files differ"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="where to run (default: a temporary directory)")
    p.add_argument("--only", choices=("bad", "killed", "changed", "seams"), default=None, help="run one kind")
    args = p.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="drift-probes-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    ENV["PYTHONPATH"] += os.pathsep + str(work)  # the probes' custom checkers
    model = tiny_model(work / "tiny-model")
    (work / "tasks.jsonl").write_text('{"id": "a", "question": "2+2?", "answer": "4"}\n')
    if args.only in (None, "bad"):
        print("## Bad input\n\n| command | input | exit | what drift said |\n|---|---|---:|---|")
        for command, what, code, line in bad_inputs(work, model):
            print(f"| {command} | {what} | {code} | `{line}` |")
    if args.only in (None, "killed"):
        print("\n## SIGKILL inside a stage of `drift run`, then the same command\n\n| stage | kill | rerun |\n|---|---|---|")
        for name, state, outcome in killed(work, model):
            print(f"| {name} | {state} | {outcome} |")
    if args.only in (None, "changed"):
        print("\n## The same `drift run` with one setting changed\n\n| change | what drift said |\n|---|---|")
        for what, line in changed(work, model):
            print(f"| {what} | `{line}` |")
    if args.only in (None, "seams"):
        print("\n## Checkers, a full disk, damaged outputs, shared settings, defaults\n\n"
              "| command | case | exit | what drift said |\n|---|---|---:|---|")
        for command, what, code, line in seams(work, model):
            print(f"| {command} | {what} | {code} | `{line}` |")


if __name__ == "__main__":
    main()
