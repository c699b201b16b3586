"""Layer-dropout rates over training and the per-step mask generator."""

import pytest
import torch

from hf_layerskip.modeling import layer_dropout_rates, sample_keep_masks
from hf_layerskip.trainer import LayerDropoutSchedule, layer_dropout_generator


def test_constant_schedule_is_the_models_per_layer_rates_at_every_step():
    schedule = LayerDropoutSchedule(8, 0.2, "exponential", [1, 2, 5, 7])
    expected = layer_dropout_rates(8, 0.2, "exponential", [1, 2, 5, 7])
    assert schedule.rates(0, 100) == expected
    assert schedule.rates(99, 100) == expected


def test_exponential_time_curriculum_grows_from_zero_to_full():
    schedule = LayerDropoutSchedule(6, 0.4, "linear", time_curriculum="exponential")
    assert schedule.rates(0, 10) == [0.0] * 6
    assert schedule.rates(10, 10) == pytest.approx(layer_dropout_rates(6, 0.4, "linear"))
    halfway = schedule.rates(5, 10)
    assert halfway == pytest.approx([rate * (2**0.5 - 1) for rate in layer_dropout_rates(6, 0.4, "linear")])


def test_generator_is_a_function_of_seed_step_and_draw():
    rates = [0.5] * 6

    def masks(seed, step, draw):
        return sample_keep_masks(rates, 16, layer_dropout_generator(seed, step, draw))

    assert torch.equal(masks(42, 7, 0), masks(42, 7, 0))
    assert not torch.equal(masks(42, 7, 0), masks(42, 7, 1))
    assert not torch.equal(masks(42, 7, 0), masks(42, 8, 0))
    assert not torch.equal(masks(42, 7, 0), masks(43, 7, 0))


@pytest.mark.parametrize(
    "settings",
    [dict(max_rate=1.5), dict(scale="cubic"), dict(time_curriculum="linear")],
)
def test_bad_settings_raise(settings):
    with pytest.raises(ValueError):
        LayerDropoutSchedule(**{"num_layers": 6, "max_rate": 0.1, **settings})
