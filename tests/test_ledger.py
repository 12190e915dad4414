"""The cost ledger: FLOPs rule, sums, and a stage's peak memory being its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from drift.ledger import Cost, measure


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_flops_rule_and_sums():
    a = Cost(prefill_tokens=10, generated_tokens=5, aux_forward_tokens=1, trained_tokens=3, parameters=100,
             peak_memory_bytes=7, wall_seconds=1.0)
    assert a.flops == 2 * 100 * 16 + 6 * 100 * 3
    b = a + Cost(trained_tokens=1, peak_memory_bytes=9, wall_seconds=0.5, parameters=100)
    assert (b.trained_tokens, b.peak_memory_bytes, b.wall_seconds, b.parameters) == (4, 9, 1.5, 100)
    assert Cost.from_json(b.to_json()) == b


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_a_stage_peak_does_not_hold_what_an_earlier_stage_freed():
    """Blocks below malloc's mmap threshold, freed between blocks still in use, stay in the heap
    (and in the resident set) unless the heap is trimmed."""
    chunks, pins = [], []
    for _ in range(4000):  # about 250 MB, each block followed by a small one that stays
        chunks.append(bytearray(64 * 1024))
        pins.append(bytearray(2000))
    held = rss_mb()
    del chunks
    cost = Cost()
    with measure(cost):
        pass
    assert cost.peak_memory_bytes / 2**20 < held - 150
    del pins
