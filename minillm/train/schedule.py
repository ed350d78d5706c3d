"""Learning-rate schedule: linear warmup, then linear or cosine decay to zero.

Large updates on a freshly initialized (or freshly resized) model can wreck it; warming the
learning rate up from 0 over the first steps avoids that, and decaying it towards 0 at the end
lets the weights settle. With w warmup steps, T total steps and s the index of the update:

    factor(s) = s / w                                   for s < w
    linear:     factor(s) = max(0, (T - s) / (T - w))    for s >= w
    cosine:     factor(s) = 0.5 · (1 + cos(π · (s - w) / (T - w)))
    constant:   factor(s) = 1

and lr(s) = base_lr · factor(s). These are transformers' `get_linear_schedule_with_warmup` /
`get_cosine_schedule_with_warmup` formulas (so s = 0 with warmup trains at lr 0, as there).
The schedule is a pure function of the step: a resumed run needs only the step to continue it.

Source: Goyal et al., "Accurate, Large Minibatch SGD" (2017) for warmup; Loshchilov & Hutter,
"SGDR" (2017) for cosine decay.
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "linear") -> float:
    """The multiplier of the base learning rate for update number `step` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
