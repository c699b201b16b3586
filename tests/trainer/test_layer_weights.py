"""Per-exit weights: normalised for every shape, the paper's formula for `cumulative`, the intended trends."""

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_layerskip.trainer import LAYER_WEIGHT_SHAPES, early_exit_layer_weights


@st.composite
def exit_sets(draw):
    num_layers = draw(st.integers(2, 40))
    early = draw(st.sets(st.integers(0, num_layers - 2), max_size=num_layers - 1))
    return num_layers, sorted(early) + [num_layers - 1]


@given(exits=exit_sets(), weighting=st.sampled_from(sorted(LAYER_WEIGHT_SHAPES)), scale=st.floats(0.0, 1.0))
def test_weights_sum_to_one_for_every_shape(exits, weighting, scale):
    num_layers, layers = exits
    weights = early_exit_layer_weights(layers, num_layers, weighting, scale)
    assert weights.shape == (len(layers),)
    assert (weights >= 0).all()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_cumulative_is_the_papers_formula():
    num_layers, scale = 12, 0.1
    layers = list(range(num_layers))
    paper = [scale * sum(range(layer + 1)) for layer in range(num_layers - 1)] + [sum(range(num_layers))]
    expected = torch.tensor(paper) / sum(paper)
    torch.testing.assert_close(early_exit_layer_weights(layers, num_layers, "cumulative", scale), expected)


def test_scale_sets_the_early_exits_against_the_last():
    layers = [2, 7]
    for weighting in LAYER_WEIGHT_SHAPES:
        shape = LAYER_WEIGHT_SHAPES[weighting]
        weights = early_exit_layer_weights(layers, 8, weighting, 0.25)
        assert (weights[0] / weights[1]).item() == pytest.approx(0.25 * shape(3) / shape(8), rel=1e-6)


@pytest.mark.parametrize(
    "weighting,trend", [("linear", 1), ("cumulative", 1), ("sqrt", 1), ("inverse", -1), ("inverse_sqrt", -1)]
)
def test_early_exit_weights_follow_the_shape(weighting, trend):
    weights = early_exit_layer_weights(list(range(10)), 10, weighting, 1.0)[:-1]
    steps = (weights[1:] - weights[:-1]) * trend
    assert (steps > 0).all()


def test_uniform_with_scale_one_is_uniform():
    torch.testing.assert_close(early_exit_layer_weights([0, 3, 5], 6, "uniform", 1.0), torch.full((3,), 1 / 3))


def test_scale_zero_keeps_only_the_last_exit():
    weights = early_exit_layer_weights([1, 4, 5], 6, "sqrt", 0.0)
    assert weights.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: early_exit_layer_weights([1, 5], 6, "quadratic", 0.1), "quadratic"),
        (lambda: early_exit_layer_weights([6], 6, "linear", 0.1), "[0, 5]"),
        (lambda: early_exit_layer_weights([1, 2], 6, "linear", 0.0), "weigh 0"),
        (lambda: early_exit_layer_weights([0], 6, "cumulative", 0.5), "weigh 0"),
        (lambda: early_exit_layer_weights([], 6, "linear", 0.1), "at least one"),
    ],
)
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_shapes_are_the_documented_functions_of_depth():
    depth = 5
    assert LAYER_WEIGHT_SHAPES["cumulative"](depth) == sum(range(depth))
    assert LAYER_WEIGHT_SHAPES["inverse_sqrt"](depth) == pytest.approx(1 / math.sqrt(depth))
