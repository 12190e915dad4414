"""Tasks: a problem (id, question or messages, gold answer) plus the name of its checker.

Sources, chosen by the `tasks` string:
- a built-in generator: `mc-arith`, `arith`, `mul` (see `generators.py`), deterministic by seed;
- a local `.jsonl` / `.json` / `.parquet` file (rows: `id`, `question` or `messages`, `answer`,
  optional `checker`, `extract`); GSM8K (`#### 42`) and MATH (`\\boxed{..}`) gold answers understood;
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset (needs the hub; tests use local files).
"""

from __future__ import annotations

from drift.tasks.problem import Problem, TaskSpec, load_tasks, split_problems

__all__ = ["Problem", "TaskSpec", "load_tasks", "split_problems"]
