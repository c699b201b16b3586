"""Layer dropout whose rate grows with depth, drawn per sample (LayerSkip, arXiv 2404.16710, section 4.1).

Pure functions, shared by the model and the trainer. This file travels with saved checkpoints as remote code.
"""

from collections.abc import Sequence

import torch

from .configuration_layerskip import LAYER_DROPOUT_SCALES, _check_choice, _check_range


def layer_dropout_rates(
    num_layers: int, max_rate: float, scale: str = "exponential", layers: Sequence[int] | None = None
) -> list[float]:
    """Per-layer dropout rates for `num_layers` layers.

    `scale` is `"exponential"` (p_l = max_rate·(2^(l/(L−1)) − 1)), `"linear"` (p_l = max_rate·l/(L−1)) or
    `"uniform"` (p_l = max_rate). Layers outside `layers` (all when `None`) get rate 0.
    """
    _check_range("max_rate", max_rate, 0, 1)
    _check_choice("scale", scale, LAYER_DROPOUT_SCALES)
    last = max(num_layers - 1, 1)
    shapes = {
        "exponential": lambda layer: 2.0 ** (layer / last) - 1.0,
        "linear": lambda layer: layer / last,
        "uniform": lambda layer: 1.0,
    }
    droppable = set(range(num_layers)) if layers is None else set(layers)
    return [max_rate * shapes[scale](layer) if layer in droppable else 0.0 for layer in range(num_layers)]


def sample_keep_masks(
    rates: Sequence[float], batch_size: int, generator: torch.Generator | None = None
) -> torch.BoolTensor:
    """Which samples run each layer: a `(num_layers, batch_size)` bool tensor, `True` where the layer is kept.

    Drawn on the CPU so that a generator seeded alike gives the same masks on every device and process.
    """
    rates = torch.tensor(rates, dtype=torch.float32)
    draws = torch.rand((len(rates), batch_size), generator=generator)  # (num_layers, batch_size)
    return draws >= rates[:, None]
