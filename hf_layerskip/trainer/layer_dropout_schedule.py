"""Layer-dropout rates over training: p_{l,t} = S(t)·D(l)·p_max (LayerSkip, arXiv 2404.16710, section 4.1).

D(l)·p_max comes from `hf_layerskip.modeling.layer_dropout.layer_dropout_rates`; S(t) is the time curriculum,
constant for continual pretraining and fine-tuning, exponential (2^(t/T) − 1) for pretraining from scratch.
Every rate is a pure function of the step, so a resumed run continues the schedule exactly.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.layer_dropout import layer_dropout_rates

LAYER_DROPOUT_TIME_CURRICULA = ("constant", "exponential")


@dataclass(frozen=True)
class LayerDropoutSchedule:
    num_layers: int
    max_rate: float
    scale: str = "exponential"
    layers: Sequence[int] | None = None
    time_curriculum: str = "constant"

    def __post_init__(self):
        if self.time_curriculum not in LAYER_DROPOUT_TIME_CURRICULA:
            raise ValueError(
                f"`time_curriculum` must be one of {', '.join(map(repr, LAYER_DROPOUT_TIME_CURRICULA))}, "
                f"got {self.time_curriculum!r}."
            )
        layer_dropout_rates(self.num_layers, self.max_rate, self.scale, self.layers)  # validates the rest

    @property
    def enabled(self) -> bool:
        return self.max_rate > 0

    def time_factor(self, step: int, max_steps: int) -> float:
        """S(t) in [0, 1]."""
        if self.time_curriculum == "constant":
            return 1.0
        return 2.0 ** (min(step, max_steps) / max(max_steps, 1)) - 1.0

    def rates(self, step: int, max_steps: int) -> list[float]:
        """One dropout rate per layer at optimizer step `step` of `max_steps`."""
        max_rate = self.max_rate * self.time_factor(step, max_steps)
        return layer_dropout_rates(self.num_layers, max_rate, self.scale, self.layers)


def layer_dropout_generator(seed: int, step: int, draw: int) -> torch.Generator:
    """A CPU generator for the layer-dropout masks of micro-batch `draw` of optimizer step `step`.

    Seeded from `(seed, step, draw)` only, so every process draws the same masks and a resumed run draws the
    masks the interrupted run would have drawn.
    """
    (mixed_seed,) = np.random.SeedSequence([seed, step, draw]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(mixed_seed))
