"""`drift inspect`: show one training row as the trainer sees it, trained tokens marked.

Trained spans are wrapped in [[ ]] (plain text, so the output can be diffed and pasted), e.g.
    <|im_start|>assistant
    [[<answer>4</answer><|im_end|>]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from drift import DriftError
from drift.config import option
from drift.records import RowError, WeightedRow, check_row_schema, read_jsonl
from drift.train.data import tokenize_row, truncate

OPEN, CLOSE = "[[", "]]"


@dataclass
class InspectConfig:
    data: str = option("", "weighted JSONL file (rows with messages and weight)")
    model: str = option("smollm2-135m", "model whose tokenizer and chat template build the masks")
    row: int = option(1, "line number of the row in the file (1-based, as in error messages)")
    turns: Literal["last", "all"] = option("last", "which assistant messages are trained, as in `drift train`")
    max_length: int = option(1024, "token limit, as in `drift train` (shows the truncation)")


def mark_trained(input_ids: list[int], mask: list[int], tokenizer: Any) -> str:
    """The decoded tokens with every run of trained tokens (mask 1) wrapped in [[ ]]."""
    parts, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or mask[i] != mask[start]:
            text = tokenizer.decode(input_ids[start:i])
            parts.append(f"{OPEN}{text}{CLOSE}" if mask[start] else text)
            start = i
    return "".join(parts)


def inspect_row(data: str, model: str, row: int, turns: str = "last", max_length: int = 1024) -> str:
    """A header (weight, token counts, truncation) and the row with its trained tokens marked."""
    from drift.models import load_tokenizer

    found = next((r for line, r in read_jsonl(data) if line == row), None)
    if found is None:
        raise DriftError(f"{data}: no row on line {row}")
    check_row_schema(found, f"{data}:{row}")
    tokenizer = load_tokenizer(model)
    try:
        weight = WeightedRow.from_json(found, allow_negative=True).weight
        ids, mask, cut = tokenize_row(found, tokenizer, turns)
        ids, mask, left, right = truncate(ids, mask, max_length)
    except RowError as e:
        raise DriftError(f"{data}:{row}: {e}") from None
    header = (f"row {row} of {data}: weight {weight:.6g}, {len(ids)} tokens, {sum(mask)} trained "
              f"(marked {OPEN} {CLOSE}), turns={turns}")
    if cut:
        header += f"; {cut} trained turn(s) hit max_new_tokens: their end-of-turn token is not trained"
    if left or right:
        header += f"; truncated to {max_length}: {left} prompt tokens cut from the left, {right} from the end"
    return f"{header}\n\n{mark_trained(ids, mask, tokenizer)}"


def run_inspect(cfg: InspectConfig) -> str:
    if not cfg.data:
        raise DriftError("inspect: give the data file")
    return inspect_row(cfg.data, cfg.model, cfg.row, cfg.turns, cfg.max_length)
