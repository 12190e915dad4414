"""The judging overhead of the code environment: wall time of one `step` (sandbox start, the tests,
the verdict), per answer, judged one at a time in this process and as batches in the worker pool.

Answers are the reference solutions of the task set (all tests pass: the longest path) and a wrong
function (the first test fails). Side by side in one run:

    python benchmarks/code_env_bench.py --answers 32 --batch 8 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import time

from drift.env import EnvConfig, Episode
from drift.envs.runner import EnvRunner
from drift.envs.sandbox import isolation
from drift.tasks import TaskSpec, load_tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="answers judged at once in the pool")
    ap.add_argument("--workers", type=int, default=2, help="checker worker processes")
    args = ap.parse_args()
    problems = load_tasks(TaskSpec(tasks="code", num_problems=args.answers, task_seed=1))
    cfg = EnvConfig(env="code", max_turns=1, check_workers=args.workers, check_timeout=30)
    runner = EnvRunner(cfg)
    local = runner.env  # the same environment, called here
    openings = runner.resets(problems)
    print(f"isolation: {isolation()}; {args.answers} answers; pool: {args.workers} workers, batches of {args.batch}")
    for kind in ("right", "wrong"):
        def answer(p):
            body = p.answer if kind == "right" else f"def {p.metadata['entry_point']}(*args):\n    return None\n"
            return f"```python\n{body}```"

        per = []
        for p, opening in zip(problems, openings):
            ep = Episode(p, 0, opening, 1)
            t0 = time.perf_counter()
            local.step(ep.row, ep.answer(answer(p)))
            per.append(1000 * (time.perf_counter() - t0))
        episodes = [Episode(p, 0, o, 1) for p, o in zip(problems, openings)]
        for ep in episodes:
            ep.answer(answer(ep.problem))
        runner.steps(episodes[: args.workers])  # the workers start and build the environment
        t0 = time.perf_counter()
        for i in range(0, len(episodes), args.batch):
            runner.steps(episodes[i:i + args.batch])
        pooled = 1000 * (time.perf_counter() - t0) / len(episodes)
        print(f"{kind:5s} answers: in-process step median {statistics.median(per):.0f} ms "
              f"(p90 {sorted(per)[int(0.9 * len(per))]:.0f} ms); pooled, per answer {pooled:.0f} ms")


if __name__ == "__main__":
    main()
