"""The LayerSkip models, one per family. Every module in this folder travels with saved checkpoints as remote code."""

from .configuration_layerskip import LayerSkipConfigMixin
from .configuration_layerskip_gemma3 import LayerSkipGemma3TextConfig
from .configuration_layerskip_llama import LayerSkipLlamaConfig
from .configuration_layerskip_mistral import LayerSkipMistralConfig
from .configuration_layerskip_phi3 import LayerSkipPhi3Config
from .configuration_layerskip_qwen2 import LayerSkipQwen2Config
from .configuration_layerskip_qwen3 import LayerSkipQwen3Config
from .layer_dropout import layer_dropout_rates, sample_keep_masks
from .modeling_layerskip import (
    LayerSkipCausalLMOutput,
    LayerSkipForCausalLMMixin,
    LayerSkipModelMixin,
    LayerSkipModelOutput,
)
from .modeling_layerskip_gemma3 import LayerSkipGemma3ForCausalLM, LayerSkipGemma3TextModel
from .modeling_layerskip_llama import LayerSkipLlamaForCausalLM, LayerSkipLlamaModel
from .modeling_layerskip_mistral import LayerSkipMistralForCausalLM, LayerSkipMistralModel
from .modeling_layerskip_phi3 import LayerSkipPhi3ForCausalLM, LayerSkipPhi3Model
from .modeling_layerskip_qwen2 import LayerSkipQwen2ForCausalLM, LayerSkipQwen2Model
from .modeling_layerskip_qwen3 import LayerSkipQwen3ForCausalLM, LayerSkipQwen3Model
from .self_speculative import SelfSpeculativeOutput, SpeculationStats

# Each family: the stock `model_type` it converts from, and its LayerSkip config, base model and causal LM.
FAMILIES = {
    "llama": (LayerSkipLlamaConfig, LayerSkipLlamaModel, LayerSkipLlamaForCausalLM),
    "qwen2": (LayerSkipQwen2Config, LayerSkipQwen2Model, LayerSkipQwen2ForCausalLM),
    "qwen3": (LayerSkipQwen3Config, LayerSkipQwen3Model, LayerSkipQwen3ForCausalLM),
    "mistral": (LayerSkipMistralConfig, LayerSkipMistralModel, LayerSkipMistralForCausalLM),
    "gemma3_text": (LayerSkipGemma3TextConfig, LayerSkipGemma3TextModel, LayerSkipGemma3ForCausalLM),
    "phi3": (LayerSkipPhi3Config, LayerSkipPhi3Model, LayerSkipPhi3ForCausalLM),
}

__all__ = [
    "FAMILIES",
    "LayerSkipConfigMixin",
    "LayerSkipModelMixin",
    "LayerSkipForCausalLMMixin",
    *(cls.__name__ for classes in FAMILIES.values() for cls in classes),
    "LayerSkipModelOutput",
    "LayerSkipCausalLMOutput",
    "SelfSpeculativeOutput",
    "SpeculationStats",
    "layer_dropout_rates",
    "sample_keep_masks",
]
