"""Tasks: a problem (id, question or messages, gold answer) plus the name of its checker.

Sources, chosen by the `tasks` string:
- a built-in generator: `mc-arith`, `arith`, `mul` (see `generators.py`), `code` (300 small Python
  functions with unit tests, `code.py`), deterministic by seed;
- a local `.jsonl` / `.json` / `.parquet` file (rows: `id`, `question` or `messages`, `answer`,
  optional `checker`, `extract`); GSM8K (`#### 42`) and MATH (`\\boxed{..}`) gold answers understood;
  code tasks (rows with `description`, `entry_point`, `tests`, optional `solution`) for `env = "code"`;
- `hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face dataset (needs the hub; tests use local files).

`split` (train | test | all) takes a fixed half of any source by a hash of the problem's
identity (`problem.split_of`): the fact for generators, the id for files and hub datasets.

Modules: `problem` (the records and the split rule), `generators`, `loader` (`load_tasks`).
"""

from __future__ import annotations

from drift.tasks.loader import load_tasks
from drift.tasks.problem import Problem, TaskSpec

__all__ = ["Problem", "TaskSpec", "load_tasks"]
