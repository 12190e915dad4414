"""Token sampling for the hf backend: greedy, or temperature + top-p by a two-level Gumbel-max draw
whose noise is a counter-based hash of (seed of the (prompt, sample, turn), tokens sampled before,
vocabulary index), computed on the logits' device. A conversation's tokens therefore do not depend
on which others share its batch (up to float rounding), and nothing of vocabulary size crosses
between devices.
"""

from __future__ import annotations

import torch

from drift.rollout.protocol import SamplingParams


BLOCK = 256  # vocabulary entries per block of the two-level draw in sample_tokens
_M32 = 0xFFFFFFFF


def sample_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [B, V]: greedy at temperature 0, else temperature + top-p.

    Row b's noise is a function of (seeds[b], counts[b] = tokens it sampled before, index) only —
    never of the batch — computed on the logits' device.

    Sampling is Gumbel-max: the argmax of logits / temperature plus Gumbel noise — the same
    distribution as softmax sampling. Batch composition changes matmul rounding in the last bits;
    that changes a choice only when the two best noisy scores all but tie, which is far rarer
    than an inverse-CDF draw landing on a shifted boundary of a cumulative sum over the
    vocabulary. It is done in two levels, so each token costs noise for V / BLOCK blocks plus
    BLOCK entries instead of V (noise for 49k entries per row took longer than a decode step on
    CPU): Gumbel-max over the blocks' log-sum-exp picks a block with probability its mass, then
    Gumbel-max within it picks an entry with probability its share of the block, so the product is
    exactly softmax(logits / temperature) restricted to top-p.
    """
    if params.temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() if params.temperature == 1 else logits.float() / params.temperature  # x / 1 is x
    if params.top_p < 1.0:
        probs, order = torch.softmax(scores, dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs >= params.top_p  # in sorted order; the top token always stays
        scores = scores.masked_fill(torch.empty_like(outside).scatter_(-1, order, outside), float("-inf"))
    B, V = scores.shape
    blocks = -(-V // BLOCK)
    if V % BLOCK:
        scores = torch.nn.functional.pad(scores, (0, blocks * BLOCK - V), value=float("-inf"))
    padded = scores.view(B, blocks, BLOCK)
    block = (torch.logsumexp(padded, -1).double() + gumbel(seeds, 2 * counts, blocks)).argmax(-1)
    within = padded[torch.arange(B, device=scores.device), block].double() + gumbel(seeds, 2 * counts + 1, BLOCK)
    return block * BLOCK + within.argmax(-1)


def gumbel(seeds: torch.Tensor, draws: torch.Tensor, n: int) -> torch.Tensor:
    """Gumbel noise [B, n] (float64): a counter-based hash of (seeds[b], draws[b], index) per entry.

    Row b's key is two 32-bit words, each a bijection of one seed half for a fixed draw and of the
    draw for a fixed half, so two (seed, draw) pairs share a noise vector only if both words
    collide. Values stay in [0, 2^32), so shifts never see a sign bit and products fit in int64.
    """
    seeds, draws = seeds[:, None], draws[:, None]
    lo = mix32((seeds & _M32) ^ mix32(draws))
    hi = mix32((seeds >> 32) ^ mix32(draws ^ 0x9E3779B9))
    index = torch.arange(n, device=seeds.device)[None]
    bits = mix32(mix32(index ^ lo) ^ hi)
    u = (bits.double() + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' "lowbias32") on int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32), in 16-bit halves of c so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32
