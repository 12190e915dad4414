"""The one loss of drift: weighted SFT (offline) and the policy gradient (online) are the same sum.

For a batch with per-token weights w_t (0 where a token is not trained) and the policy's
log-probability logp_t of each trained token:

    weighted SFT / on-policy gradient:   sum_t  w_t * (-logp_t)
    with stored old log-probs (PPO):     sum_t  -min(r_t * w_t, clip(r_t, 1 - lo, 1 + hi) * w_t),
                                         r_t = exp(logp_t - old_logp_t)
    + KL to a reference (k3):            kl_coef * sum_t m_t * (exp(d_t) - d_t - 1),  d_t = ref_logp_t - logp_t

With one optimizer step per on-policy batch, old_logp = logp (detached): the ratio is exactly 1
and the PPO form has the same gradient as the first line. The row weight w_i (an importance
weight offline, the advantage A_i online) reaches its n_i trained tokens as `token_weights` puts
it there, and the caller divides the sum by its global batch's normalizer. One vocabulary,
`normalize`, names both (offline training accepts the first three, the online arm the last two):

    normalize    token weight   global batch B divided by     loss
    mean         w_i / n_i      |B| (rows)                    sum_i w_i * mean-token-NLL_i / |B|
    weight_sum   w_i / n_i      sum_i w_i                     ... / sum_i w_i
    constant     w_i / n_i      G * mean_j |w_j| (fixed)      ... / (G * mean |w|)
    sequences    w_i / n_i      |B| (rows)                    the same loss as mean
    tokens       w_i            sum_i n_i (trained tokens)    sum_t w_t * NLL_t / trained tokens

Negative weights (swift, negative advantages) push a token's probability down, without bound
as training goes on. `nll_cap` bounds that: a negative-weight token whose NLL already exceeds
the cap contributes nothing more (its term is w_t * min(NLL_t, cap)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

Normalize = Literal["mean", "weight_sum", "constant", "sequences", "tokens"]


def token_weights(weight: float, mask: Sequence[int], normalize: Normalize) -> list[float]:
    """The weight of each token of one row (0 where mask is 0): w / n over its n trained tokens
    (the row counts as its mean token loss), or w on each under normalize = tokens."""
    scale = weight if normalize == "tokens" else weight / max(sum(mask), 1)  # a row without trained tokens (the all-pruned step's padding) weighs 0
    return [scale * m for m in mask]


def row_share(normalize: Normalize, weight: float, mask: Sequence[int]) -> float:
    """What one row adds to its global batch's normalizer (constant has no per-row share)."""
    if normalize == "constant":
        raise ValueError("normalize = constant divides by a fixed number, not a sum over rows")
    return {"tokens": float(sum(mask)), "weight_sum": weight}.get(normalize, 1.0)


def loss_targets(labels: torch.Tensor, token_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(keep, targets, weights): the positions whose next token is trained in some row, and the
    next tokens and their weights there. Logits are computed only at `keep` (the lm_head over
    a large vocabulary at every prompt position is most of the activation memory).

    labels, token_weight [B, L] -> keep [K], targets [B, K], weights [B, K].
    """
    shifted = labels[:, 1:]  # position t predicts token t + 1
    keep = (shifted != -100).any(dim=0).nonzero().squeeze(-1)
    return keep, shifted[:, keep], token_weight[:, 1:][:, keep]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) in float32; 0 where the target is -100. logits [B, K, V], targets [B, K] -> [B, K]."""
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                          reduction="none")
    return -nll.view(targets.shape)


@dataclass
class LossStats:
    """What the loss did on one batch (sums over tokens; the caller accumulates)."""

    tokens: int = 0  # trained tokens
    capped: int = 0  # negative-weight tokens past nll_cap (no gradient)
    clipped: int = 0  # tokens whose PPO ratio was clipped
    kl_sum: float = 0.0  # sum of k3 over trained tokens
    extra: dict = field(default_factory=dict)


def policy_loss_sum(logp: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, *,
                    old_logp: torch.Tensor | None = None, clip: tuple[float, float] = (0.2, 0.28),
                    ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0, kl_mass: torch.Tensor | None = None,
                    nll_cap: float | None = None) -> tuple[torch.Tensor, LossStats]:
    """The summed loss of the module docstring and its stats.

    logp, weights, valid (bool: a trained token), and the optional old_logp, ref_logp, kl_mass: [B, K].
    kl_mass m_t weighs the KL term per token (default: 1 per trained token).
    """
    stats = LossStats(tokens=int(valid.sum()))
    w = weights * valid
    if old_logp is None:
        nll = -logp
        if nll_cap is not None:
            over = (w < 0) & (nll.detach() > nll_cap)
            stats.capped = int(over.sum())
            nll = torch.where(over, nll.detach(), nll)  # the value stays honest; no gradient past the cap
        total = (w * nll).sum()
    else:
        ratio = torch.exp(logp - old_logp)
        lo, hi = clip
        clipped_ratio = ratio.clamp(1 - lo, 1 + hi)
        surrogate = torch.minimum(ratio * w, clipped_ratio * w)
        stats.clipped = int(((ratio * w != surrogate) & valid).sum())
        total = -surrogate.sum()
    if ref_logp is not None and kl_coef:
        d = (ref_logp - logp) * valid
        k3 = torch.exp(d) - d - 1
        mass = valid.float() if kl_mass is None else kl_mass * valid
        total = total + kl_coef * (mass * k3).sum()
        stats.kl_sum = float((k3 * valid).sum().detach())
    return total, stats


def weighted_nll_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                     nll_cap: float | None = None) -> tuple[torch.Tensor, LossStats]:
    """sum_t weights[t] * NLL(targets[t] | logits[t]), -100 targets skipped (the offline loss), and its stats.

    logits [B, K, V]; targets, weights [B, K]. With weights = w_i / n_i on the n_i trained
    tokens of example i this is sum_i w_i * mean-token-NLL_i.
    """
    return policy_loss_sum(token_logprobs(logits, targets), weights, targets != -100, nll_cap=nll_cap)
