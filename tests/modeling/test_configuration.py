"""LayerSkipLlamaConfig: defaults, validation of every LayerSkip field, and save/load."""

import dataclasses
import re

import pytest
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, LlamaConfig

from hf_layerskip import LayerSkipLlamaConfig
from hf_layerskip.modeling.configuration_layerskip_llama import LAYERSKIP_FIELDS

# (field, bad value, the allowed range or choices the message must name); tiny_config has 6 layers.
OUT_OF_RANGE = [
    ("layer_dropout_max", -0.1, "[0.0, 1.0]"),
    ("layer_dropout_max", 1.5, "[0.0, 1.0]"),
    ("layer_dropout_scale", "cubic", "'exponential', 'linear', 'uniform'"),
    ("layer_dropout_layers", [0, 6], "[0, 5]"),
    ("layer_dropout_layers", [-1], "[0, 5]"),
    ("early_exit_loss_scale", -0.5, "[0.0, 1.0]"),
    ("early_exit_loss_scale", 2.0, "[0.0, 1.0]"),
    ("early_exit_layer_weighting", "quadratic", "'uniform', 'linear', 'cumulative', 'sqrt', 'inverse', 'inverse_sqrt'"),
    ("early_exit_curriculum", "random", "'none', 'rotational', 'gradual', 'fixed'"),
    ("early_exit_curriculum_period", 0, "[1, inf]"),
    ("early_exit_gradual_fraction", 0.0, "(0.0, 1.0]"),
    ("early_exit_gradual_fraction", 1.5, "(0.0, 1.0]"),
    ("early_exit_layers", [2, 6], "[0, 5]"),
    ("exit_layer", 0, "[1, 5]"),
    ("exit_layer", 6, "[1, 5]"),
    ("num_speculations", 0, "[1, inf]"),
    ("num_lookup_speculations", -1, "[0, inf]"),
    ("lookup_ngram_size", 0, "[1, inf]"),
    ("exit_adapter_layers", [0], "[1, 5]"),
    ("exit_adapter_layers", [3, 6], "[1, 5]"),
    ("exit_adapter_rank", 0, "[1, 64]"),
    ("draft_vocab_size", 129, "[1, 128]"),
]


# Switches: their type is all there is to check (see the wrongly typed values below).
BOOLEAN_FIELDS = {"dynamic_exit"}


def test_every_layerskip_field_has_a_rejection_case():
    assert {field for field, _, _ in OUT_OF_RANGE} == set(LAYERSKIP_FIELDS) - BOOLEAN_FIELDS


def test_fixed_curriculum_needs_its_exit_layers():
    with pytest.raises(ValueError, match="early_exit_layers"):
        tiny_config(early_exit_curriculum="fixed")
    assert tiny_config(early_exit_curriculum="fixed", early_exit_layers=[1, 3]).early_exit_layers == [1, 3]


def test_layerskip_fields_are_the_ones_added_to_llama():
    llama_fields = {field.name for field in dataclasses.fields(LlamaConfig)}
    added = [field.name for field in dataclasses.fields(LayerSkipLlamaConfig) if field.name not in llama_fields]
    assert tuple(added) == LAYERSKIP_FIELDS


@pytest.mark.parametrize("field, value, allowed", OUT_OF_RANGE)
def test_out_of_range_values_raise_value_error_naming_value_and_range(field, value, allowed):
    bad = value[-1] if isinstance(value, list) else value
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")) as error:
        tiny_config(**{field: value})
    assert repr(bad) in str(error.value)
    assert allowed in str(error.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_dropout_max", "0.1"),
        ("exit_layer", 2.5),
        ("num_speculations", 1.5),
        ("layer_dropout_layers", [1.5]),
        ("dynamic_exit", "yes"),
    ],
)
def test_wrongly_typed_values_are_rejected_naming_field_and_value(field, value):
    with pytest.raises(StrictDataclassFieldValidationError, match=re.escape(field)) as error:
        tiny_config(**{field: value})
    assert repr(value) in str(error.value)


def test_needs_two_layers_to_exit_early():
    with pytest.raises(ValueError, match="num_hidden_layers=1"):
        tiny_config(num_hidden_layers=1)


@pytest.mark.parametrize("num_layers, expected", [(2, 1), (6, 1), (8, 2), (30, 7), (32, 8)])
def test_default_exit_layer_is_a_quarter_of_the_depth(num_layers, expected):
    assert tiny_config(num_hidden_layers=num_layers).exit_layer == expected


def test_defaults_follow_the_paper_recipe():
    config = tiny_config()
    assert (config.layer_dropout_max, config.layer_dropout_scale, config.layer_dropout_layers) == (0.1, "exponential", None)
    assert (config.early_exit_loss_scale, config.early_exit_layer_weighting) == (0.1, "cumulative")
    assert (config.early_exit_curriculum, config.early_exit_curriculum_period) == ("rotational", 8)
    assert (config.early_exit_gradual_fraction, config.early_exit_layers, config.num_speculations) == (0.5, None, 6)


def test_save_and_load_round_trip(tmp_path):
    settings = dict(
        layer_dropout_max=0.3,
        layer_dropout_scale="linear",
        layer_dropout_layers=[1, 3, 4],
        early_exit_loss_scale=0.25,
        early_exit_layer_weighting="inverse_sqrt",
        early_exit_curriculum="gradual",
        early_exit_curriculum_period=3,
        early_exit_layers=[1, 3],
        early_exit_gradual_fraction=0.75,
        exit_layer=4,
        num_speculations=2,
        num_lookup_speculations=5,
        lookup_ngram_size=3,
        dynamic_exit=True,
        exit_adapter_layers=[2, 4],
        exit_adapter_rank=16,
        draft_vocab_size=100,
    )
    assert set(settings) == set(LAYERSKIP_FIELDS)
    config = tiny_config(**settings)
    config.save_pretrained(tmp_path)
    for loaded in (LayerSkipLlamaConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is LayerSkipLlamaConfig
        assert _without_path(loaded.to_dict()) == _without_path(config.to_dict())
        assert {field: getattr(loaded, field) for field in settings} == settings


def _without_path(config_dict: dict) -> dict:
    return {key: value for key, value in config_dict.items() if key != "_name_or_path"}
