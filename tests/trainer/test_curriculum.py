"""Exit curricula, step by step, and their independence from history (so a resume continues them)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_layerskip.trainer import (
    FixedCurriculum,
    GradualCurriculum,
    NoCurriculum,
    RotationalCurriculum,
    build_curriculum,
)


def test_rotational_switches_every_rth_layer_rotating_each_step():
    curriculum = RotationalCurriculum(period=3)
    expected = {0: [0, 3, 6, 7], 1: [1, 4, 7], 2: [2, 5, 7], 3: [0, 3, 6, 7], 4: [1, 4, 7]}
    for step, layers in expected.items():
        assert curriculum.active_layers(step, num_layers=8, max_steps=100) == layers


def test_rotational_covers_every_early_exit_once_per_period():
    curriculum, num_layers = RotationalCurriculum(period=4), 10
    seen = [layer for step in range(4) for layer in curriculum.active_layers(step, num_layers, 50)[:-1]]
    assert sorted(seen) == list(range(num_layers - 1))


def test_gradual_switches_on_from_the_last_layer_towards_the_first():
    curriculum = GradualCurriculum(fraction=0.5)
    # L=5, T=8: all four early exits on after 0.5·8 = 4 steps, one more each step, deepest first.
    expected = {0: [4], 1: [3, 4], 2: [2, 3, 4], 3: [1, 2, 3, 4], 4: [0, 1, 2, 3, 4], 7: [0, 1, 2, 3, 4]}
    for step, layers in expected.items():
        assert curriculum.active_layers(step, num_layers=5, max_steps=8) == layers


def test_gradual_is_fully_on_at_the_fraction_of_training():
    curriculum = GradualCurriculum(fraction=0.3)
    num_layers, max_steps = 12, 1000
    assert curriculum.active_layers(299, num_layers, max_steps) != list(range(num_layers))
    assert curriculum.active_layers(300, num_layers, max_steps) == list(range(num_layers))


def test_none_trains_every_exit():
    assert NoCurriculum().active_layers(17, 6, 100) == [0, 1, 2, 3, 4, 5]


@given(
    name=st.sampled_from(["none", "rotational", "gradual"]),
    num_layers=st.integers(2, 40),
    period=st.integers(1, 12),
    fraction=st.floats(0.01, 1.0),
    max_steps=st.integers(1, 500),
    step=st.integers(0, 600),
)
def test_last_layer_always_on_and_layers_sorted_unique(name, num_layers, period, fraction, max_steps, step):
    layers = build_curriculum(name, period, fraction).active_layers(step, num_layers, max_steps)
    assert layers[-1] == num_layers - 1
    assert layers == sorted(set(layers))
    assert all(0 <= layer < num_layers for layer in layers)


def test_schedule_depends_on_the_step_only():
    """What a resumed run relies on: asking for steps out of order gives the same answers."""
    curriculum = build_curriculum("gradual", gradual_fraction=0.5)
    in_order = [curriculum.active_layers(step, 9, 40) for step in range(40)]
    shuffled = {step: curriculum.active_layers(step, 9, 40) for step in reversed(range(40))}
    assert in_order == [shuffled[step] for step in range(40)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_curriculum("linear"),
        lambda: RotationalCurriculum(0),
        lambda: GradualCurriculum(0.0),
        lambda: build_curriculum("fixed"),
        lambda: FixedCurriculum((3,)).active_layers(0, 3, 10),
    ],
)
def test_bad_settings_raise(call):
    with pytest.raises(ValueError):
        call()


def test_fixed_curriculum_trains_its_exits_and_the_last_every_step():
    curriculum = build_curriculum("fixed", layers=(9, 5, 5))
    assert [curriculum.active_layers(step, 30, 100) for step in (0, 1, 99)] == [[5, 9, 29]] * 3
    assert build_curriculum("fixed", layers=(29,)).active_layers(0, 30, 100) == [29]
