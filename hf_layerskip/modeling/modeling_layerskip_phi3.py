"""LayerSkip Phi-3: a `Phi3ForCausalLM` with per-sample layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`. Phi-3 states nothing of its own: its fused qkv and gate-up projections are in the stock decoder layers; with
`config.sliding_window` set, every layer is a sliding-window layer, as the stock model masks them.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

from transformers import Phi3ForCausalLM, Phi3Model

from .configuration_layerskip_phi3 import LayerSkipPhi3Config
from .modeling_layerskip import LayerSkipForCausalLMMixin, LayerSkipModelMixin


class LayerSkipPhi3Model(LayerSkipModelMixin, Phi3Model):
    config_class = LayerSkipPhi3Config


class LayerSkipPhi3ForCausalLM(LayerSkipForCausalLMMixin, Phi3ForCausalLM):
    config_class = LayerSkipPhi3Config
    layerskip_model_class = LayerSkipPhi3Model


__all__ = ["LayerSkipPhi3Model", "LayerSkipPhi3ForCausalLM"]
