"""LayerSkip Qwen2: a `Qwen2ForCausalLM` with per-sample layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`. Qwen2 states nothing of its own: its sliding-window layers come from `config.layer_types`.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration_layerskip_qwen2 import LayerSkipQwen2Config
from .modeling_layerskip import LayerSkipForCausalLMMixin, LayerSkipModelMixin


class LayerSkipQwen2Model(LayerSkipModelMixin, Qwen2Model):
    config_class = LayerSkipQwen2Config


class LayerSkipQwen2ForCausalLM(LayerSkipForCausalLMMixin, Qwen2ForCausalLM):
    config_class = LayerSkipQwen2Config
    layerskip_model_class = LayerSkipQwen2Model


__all__ = ["LayerSkipQwen2Model", "LayerSkipQwen2ForCausalLM"]
