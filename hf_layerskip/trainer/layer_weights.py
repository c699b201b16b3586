"""Per-exit weights of the early-exit loss (LayerSkip, arXiv 2404.16710, section 4.2).

The paper weights exit `l` of `L` by e(l) = e_scale·Σ_{i=0}^{l} i for the early exits (l < L−1) and by
Σ_{i=0}^{L−1} i for the last, then normalises over the exits trained at that step. Here the depth profile
Σ_{i=0}^{l} i is one of several shapes, all functions of the depth d = l + 1 (layers run to reach the exit).
"""

import math
from collections.abc import Sequence

import torch

from ..modeling.configuration_layerskip_llama import _check_choice, _check_range

# Unnormalised weight of an exit at depth d (1-based).
LAYER_WEIGHT_SHAPES = {
    "uniform": lambda depth: 1.0,
    "linear": lambda depth: float(depth),
    "cumulative": lambda depth: depth * (depth - 1) / 2,  # Σ_{i=0}^{l} i, the paper's; 0 for the first layer
    "sqrt": lambda depth: math.sqrt(depth),
    "inverse": lambda depth: 1.0 / depth,
    "inverse_sqrt": lambda depth: 1.0 / math.sqrt(depth),
}


def early_exit_layer_weights(
    layers: Sequence[int], num_layers: int, weighting: str = "cumulative", loss_scale: float = 0.1
) -> torch.Tensor:
    """Normalised weights `(len(layers),)` of the exits after `layers` (0-based indices, any order).

    An early exit `l < num_layers − 1` weighs `loss_scale·shape(l + 1)`, the last exit `shape(num_layers)`; the
    weights are divided by their sum, so they sum to 1 over `layers`.
    """
    _check_choice("weighting", weighting, LAYER_WEIGHT_SHAPES)
    _check_range("loss_scale", loss_scale, 0, math.inf)
    if not layers:
        raise ValueError("`layers` must name at least one exit.")
    for layer in layers:
        _check_range("layers", layer, 0, num_layers - 1)
    shape = LAYER_WEIGHT_SHAPES[weighting]
    last = num_layers - 1
    raw = torch.tensor(
        [shape(layer + 1) * (1.0 if layer == last else loss_scale) for layer in layers], dtype=torch.float64
    )
    total = raw.sum()
    if total <= 0:
        raise ValueError(
            f"The exits {list(layers)} all weigh 0 under weighting={weighting!r} and loss_scale={loss_scale!r}; "
            "include the last layer or raise the scale."
        )
    return (raw / total).float()
