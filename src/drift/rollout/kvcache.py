"""Key/value caches of the hf backend: one conversation's (`KV`), and a batch's, left-padded into
preallocated buffers (`pack`, `BufferLayer`) so a decode step writes in place instead of
concatenating.

Layout of a batch cache: per layer `[B, H, T, D]` keys and values, each row left-padded; a row's
tokens occupy columns `start[r]..T-1` and have positions `0..T-1-start[r]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BufferLayer(DynamicLayer):
    """A cache layer that writes into preallocated buffers instead of concatenating every step."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None, length: int, spare: int):
        super().__init__()
        self.kbuf, self.vbuf, self.length, self.spare = keys, values, length, spare
        if keys is not None:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.set_views()

    def set_views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.kbuf is None or self.length + n > self.kbuf.shape[-2]:
            self._grow(key_states, value_states, self.length + n + self.spare)
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.set_views()
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        b, h, _, dk = k.shape
        kbuf = k.new_empty(b, h, capacity, dk)  # columns past `length` are written before they are read
        vbuf = v.new_empty(b, h, capacity, v.shape[-1])
        if self.kbuf is not None:
            kbuf[:, :, : self.length] = self.keys
            vbuf[:, :, : self.length] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True


@dataclass
class KV:
    """Keys/values of one token sequence: per layer `[H, L, D]`, computed from `ids`."""

    ids: list[int]
    keys: list[torch.Tensor]  # per layer [H, L, D]; empty list when L == 0
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def pack(parts: list[tuple[list[torch.Tensor], list[torch.Tensor], int]], spare: int, n_layers: int):
    """Left-pad per-row (keys, values, length) into one cache with `spare` free columns.

    Returns (cache, start [B], T): row r occupies columns start[r]..T-1.
    """
    T = max(length for _, _, length in parts)
    start = torch.tensor([T - length for _, _, length in parts])
    first = next((p for p in parts if p[2] > 0), None)
    if first is None:
        return Cache(layers=[BufferLayer(None, None, 0, spare) for _ in range(n_layers)]), start, 0
    layers = []
    for li, (k0, v0) in enumerate(zip(first[0], first[1])):
        # The first T columns are zeroed in one go (the padding is masked, but must be finite:
        # attention weighs it by 0); the spare columns are written before they are read.
        kbuf = k0.new_empty(len(parts), k0.shape[0], T + spare, k0.shape[-1])
        vbuf = v0.new_empty(len(parts), v0.shape[0], T + spare, v0.shape[-1])
        kbuf[:, :, :T] = 0
        vbuf[:, :, :T] = 0
        for r, (ks, vs, length) in enumerate(parts):
            if length:
                kbuf[r, :, T - length : T] = ks[li]
                vbuf[r, :, T - length : T] = vs[li]
        layers.append(BufferLayer(kbuf, vbuf, T, spare))
    return Cache(layers=layers), start, T


def columns(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of the column ranges `spans` of x [H, T, D], joined: [H, sum of lengths, D]."""
    return torch.cat([x[:, a:b] for a, b in spans if b > a], 1)
