"""LayerSkip Gemma 3 (text): a `Gemma3ForCausalLM` with layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`. What Gemma 3 states: a rotary embedding per layer type
(local for sliding-window layers, global for the others).
Its scaled embeddings (`embed_tokens` scales), sandwich norms and per-head q/k norms are the stock modules; its
layer types and `final_logit_softcapping` come from the config.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

from transformers import Gemma3ForCausalLM, Gemma3TextModel

from .configuration_layerskip_gemma3 import LayerSkipGemma3TextConfig
from .modeling_layerskip import LayerSkipForCausalLMMixin, LayerSkipModelMixin


class LayerSkipGemma3TextModel(LayerSkipModelMixin, Gemma3TextModel):
    config_class = LayerSkipGemma3TextConfig

    # Override: one rotary embedding per layer type, as the stock forward builds them.
    def position_embeddings(self, hidden_states, position_ids):
        return {
            layer_type: self.rotary_emb(hidden_states, position_ids, layer_type)
            for layer_type in dict.fromkeys(self.config.layer_types)
        }


class LayerSkipGemma3ForCausalLM(LayerSkipForCausalLMMixin, Gemma3ForCausalLM):
    config_class = LayerSkipGemma3TextConfig
    layerskip_model_class = LayerSkipGemma3TextModel


__all__ = ["LayerSkipGemma3TextModel", "LayerSkipGemma3ForCausalLM"]
