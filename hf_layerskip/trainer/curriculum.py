"""Which exits the early-exit loss trains at each step (LayerSkip, arXiv 2404.16710, section 4.2).

Each curriculum is a pure function of the optimizer step, so a resumed run continues the schedule exactly.
The last layer is always on.
"""

import math
from dataclasses import dataclass

from ..modeling.configuration_layerskip_llama import EARLY_EXIT_CURRICULA, _check_choice, _check_range


@dataclass(frozen=True)
class NoCurriculum:
    """Every exit, every step."""

    def active_layers(self, step: int, num_layers: int, max_steps: int) -> list[int]:
        return list(range(num_layers))


@dataclass(frozen=True)
class RotationalCurriculum:
    """Every `period`-th early exit, shifted by one layer each step: at step t, the layers l < L−1 with
    l ≡ t (mod period), and the last layer."""

    period: int

    def __post_init__(self):
        _check_range("period", self.period, 1, math.inf)

    def active_layers(self, step: int, num_layers: int, max_steps: int) -> list[int]:
        offset = step % self.period
        return [*range(offset, num_layers - 1, self.period), num_layers - 1]


@dataclass(frozen=True)
class GradualCurriculum:
    """Early exits switched on one by one from the last towards the first, all of them on after `fraction` of
    the `max_steps` steps: early layer l switches on at step ⌈(L−1−l)/(L−1)·fraction·max_steps⌉."""

    fraction: float

    def __post_init__(self):
        _check_range("fraction", self.fraction, 0, 1, low_inclusive=False)

    def switch_on_step(self, layer: int, num_layers: int, max_steps: int) -> int:
        """The first step at which the exit after `layer` is trained."""
        num_early = num_layers - 1
        return math.ceil((num_early - layer) * self.fraction * max_steps / num_early)

    def active_layers(self, step: int, num_layers: int, max_steps: int) -> list[int]:
        early = [layer for layer in range(num_layers - 1) if step >= self.switch_on_step(layer, num_layers, max_steps)]
        return [*early, num_layers - 1]


@dataclass(frozen=True)
class FixedCurriculum:
    """The same early exits every step, for a model meant to draft at them: `layers` (0-based) and the last layer."""

    layers: tuple[int, ...]

    def __post_init__(self):
        if not self.layers:
            raise ValueError("The fixed curriculum needs at least one exit layer in `layers`.")

    def active_layers(self, step: int, num_layers: int, max_steps: int) -> list[int]:
        for layer in self.layers:
            _check_range("layers", layer, 0, num_layers - 1)
        return sorted({*self.layers, num_layers - 1})


EarlyExitCurriculum = NoCurriculum | RotationalCurriculum | GradualCurriculum | FixedCurriculum


def build_curriculum(
    name: str, period: int = 8, gradual_fraction: float = 0.5, layers: tuple[int, ...] | None = None
) -> EarlyExitCurriculum:
    """The curriculum called `name`: `"none"`, `"rotational"` (uses `period`), `"gradual"` (uses
    `gradual_fraction`) or `"fixed"` (uses `layers`)."""
    _check_choice("early_exit_curriculum", name, EARLY_EXIT_CURRICULA)
    if name == "none":
        return NoCurriculum()
    if name == "rotational":
        return RotationalCurriculum(period)
    if name == "gradual":
        return GradualCurriculum(gradual_fraction)
    return FixedCurriculum(tuple(layers or ()))
