"""LayerSkip Llama: a `LlamaForCausalLM` with per-sample layer dropout, early exit and self-speculative decoding.

Everything LayerSkip adds lives in `modeling_layerskip.py`; Llama states nothing of its own. This file travels with
saved checkpoints as remote code: it may import only torch, transformers and same-folder modules.
"""

from transformers import LlamaForCausalLM, LlamaModel

from .configuration_layerskip_llama import LayerSkipLlamaConfig
from .modeling_layerskip import (  # noqa: F401  (the outputs, importable from each family's module)
    LayerSkipCausalLMOutput,
    LayerSkipForCausalLMMixin,
    LayerSkipModelMixin,
    LayerSkipModelOutput,
)


class LayerSkipLlamaModel(LayerSkipModelMixin, LlamaModel):
    config_class = LayerSkipLlamaConfig


class LayerSkipLlamaForCausalLM(LayerSkipForCausalLMMixin, LlamaForCausalLM):
    config_class = LayerSkipLlamaConfig
    layerskip_model_class = LayerSkipLlamaModel


__all__ = ["LayerSkipLlamaModel", "LayerSkipLlamaForCausalLM", "LayerSkipModelOutput", "LayerSkipCausalLMOutput"]
