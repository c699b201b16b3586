"""hf_layerskip: LayerSkip (arXiv 2404.16710) for Hugging Face Transformers.

Importing it registers `LayerSkipLlamaConfig`, `LayerSkipLlamaModel` and `LayerSkipLlamaForCausalLM` with the Auto
classes, and marks them so that `save_pretrained` ships their code for `trust_remote_code=True` loading.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import *  # noqa: F403
from .modeling import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM, LayerSkipLlamaModel
from .modeling import __all__ as _modeling_all

__version__ = "0.1.0"

AutoConfig.register(LayerSkipLlamaConfig.model_type, LayerSkipLlamaConfig)
AutoModel.register(LayerSkipLlamaConfig, LayerSkipLlamaModel)
AutoModelForCausalLM.register(LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM)
LayerSkipLlamaConfig.register_for_auto_class()
LayerSkipLlamaModel.register_for_auto_class("AutoModel")
LayerSkipLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [*_modeling_all, "__version__"]
