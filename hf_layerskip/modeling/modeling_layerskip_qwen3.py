"""LayerSkip Qwen3: a `Qwen3ForCausalLM` with per-sample layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`. Qwen3 states nothing of its own: its per-head q/k norms are in the stock decoder layers, its sliding-window
layers come from `config.layer_types`.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

from transformers import Qwen3ForCausalLM, Qwen3Model

from .configuration_layerskip_qwen3 import LayerSkipQwen3Config
from .modeling_layerskip import LayerSkipForCausalLMMixin, LayerSkipModelMixin


class LayerSkipQwen3Model(LayerSkipModelMixin, Qwen3Model):
    config_class = LayerSkipQwen3Config


class LayerSkipQwen3ForCausalLM(LayerSkipForCausalLMMixin, Qwen3ForCausalLM):
    config_class = LayerSkipQwen3Config
    layerskip_model_class = LayerSkipQwen3Model


__all__ = ["LayerSkipQwen3Model", "LayerSkipQwen3ForCausalLM"]
