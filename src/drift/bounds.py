"""One rule per numeric setting that several stages share, checked wherever the setting appears.

`drift train`, `drift online` (and, through them, `drift run`'s arms) take the same optimization
and loss settings, and `drift weights` and the online arm the same beta (DRIFT's temperature,
the coefficient of kl = matched); each config calls `check_bounds` on its own keys when it is
built, so a value one stage refuses is refused by every stage, with the same line, before any
model is loaded.
"""

from __future__ import annotations

import math
from typing import Any

from drift import DriftError

# key: (lowest value, whether the lowest itself is allowed, whether None (unset) is allowed, integer)
BOUNDS: dict[str, tuple[float, bool, bool, bool]] = {
    "lr": (0.0, False, False, False),
    "beta": (0.0, False, False, False),
    "weight_decay": (0.0, True, False, False),
    "max_grad_norm": (0.0, True, False, False),
    "negative_nll_cap": (0.0, True, True, False),
    "kl_coef": (0.0, True, True, False),
    "max_length": (1, True, False, True),
    "lora_r": (1, True, False, True),
    "lora_alpha": (1, True, False, True),
}


def check_bounds(cfg: Any, keys: tuple[str, ...], prefix: str = "", also: str = "") -> None:
    """Raise DriftError naming the first of `keys` whose value in `cfg` breaks its rule (BOUNDS);
    `also` names a word the caller accepts besides (the weights stage's beta = auto)."""
    for key in keys:
        low, inclusive, unset_ok, integer = BOUNDS[key]
        value = getattr(cfg, key)
        if value is None and unset_ok:
            continue
        if integer:
            if not isinstance(value, int) or value < low:
                raise DriftError(f"config key '{prefix}{key}' must be >= {low}, got {value}")
            continue
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            raise DriftError(f"config key '{prefix}{key}' must be a finite number {'>=' if inclusive else '>'} {low:g}"
                             f"{' (or none)' if unset_ok else ''}{f' or {also}' if also else ''}, got {value}")


def check_unit_interval(cfg: Any, key: str, open_low: bool = True, prefix: str = "") -> None:
    """`key` in (0, 1] (open_low) or [0, 1)."""
    value = getattr(cfg, key)
    ok = math.isfinite(value) and (0 < value <= 1 if open_low else 0 <= value < 1)
    if not ok:
        raise DriftError(f"config key '{prefix}{key}' must be in {'(0, 1]' if open_low else '[0, 1)'}, got {value}")
