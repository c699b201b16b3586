"""LayerSkip Mistral: a `MistralForCausalLM` with per-sample layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`. Mistral states nothing of its own: with `config.sliding_window` set, every layer is a sliding-window layer, as the
stock model masks them.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

from transformers import MistralForCausalLM, MistralModel

from .configuration_layerskip_mistral import LayerSkipMistralConfig
from .modeling_layerskip import LayerSkipForCausalLMMixin, LayerSkipModelMixin


class LayerSkipMistralModel(LayerSkipModelMixin, MistralModel):
    config_class = LayerSkipMistralConfig


class LayerSkipMistralForCausalLM(LayerSkipForCausalLMMixin, MistralForCausalLM):
    config_class = LayerSkipMistralConfig
    layerskip_model_class = LayerSkipMistralModel


__all__ = ["LayerSkipMistralModel", "LayerSkipMistralForCausalLM"]
