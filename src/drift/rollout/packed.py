"""Linear layers whose bf16 weights oneDNN lays out once, for generation on CPUs with bf16 units.

A bf16 `nn.Linear` on such a CPU runs oneDNN's AMX/AVX512-BF16 kernel, which first copies the
plain `[out, in]` weight into its blocked layout — at every call. In prefill (thousands of rows)
that copy is noise; in a decode step (one row per conversation, 32 in the demo) it costs as much as
the product itself: on one thread, a 32-row product with SmolLM2's 49k-entry lm_head took 5.4 ms
with the weight laid out once against 9.4 ms, and a decode step of the demo's rollout 17% less
time (docs/benchmarks.md). The kernel is the same, so the numbers are too: every output checked
equal bit for bit (row counts 1 to 4096, with and without bias, strided inputs).

Only for weights that do not change: the rollout and eval backends' own models and the online
arm's per-iteration generation copy of its policy, never the policy itself, which trains. Not for float32, where the plain product is MKL's
and the laid-out one oneDNN's, so their roundings differ.
"""

from __future__ import annotations

import torch

from drift.hardware import fast_bf16


class PackedLinear(torch.nn.Module):
    """`linear`'s forward with its weight in oneDNN's layout (inference only: no gradient)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # opaque mkldnn tensor
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: torch.nn.Module) -> bool:
    """Would packing speed `model` up without changing a result: bf16 on a CPU with bf16 units."""
    return (model.device.type == "cpu" and model.dtype == torch.bfloat16 and fast_bf16("cpu")
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every bf16 `nn.Linear` of `model` by a PackedLinear, in place; return how many.

    A tied lm_head keeps the embedding it shares its weight with (the packed copy is extra memory,
    54 MiB for SmolLM2-135M's).
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PackedLinear(linear))
    return len(targets)
