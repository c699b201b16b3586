"""The LayerSkip Llama model. Every module in this folder travels with saved checkpoints as remote code."""

from .configuration_layerskip_llama import LayerSkipLlamaConfig
from .layer_dropout import layer_dropout_rates, sample_keep_masks
from .modeling_layerskip_llama import (
    LayerSkipCausalLMOutput,
    LayerSkipLlamaForCausalLM,
    LayerSkipLlamaModel,
    LayerSkipModelOutput,
)
from .self_speculative import SelfSpeculativeOutput, SpeculationStats

__all__ = [
    "LayerSkipLlamaConfig",
    "LayerSkipLlamaModel",
    "LayerSkipLlamaForCausalLM",
    "LayerSkipModelOutput",
    "LayerSkipCausalLMOutput",
    "SelfSpeculativeOutput",
    "SpeculationStats",
    "layer_dropout_rates",
    "sample_keep_masks",
]
