"""hf_layerskip: LayerSkip (arXiv 2404.16710) for Hugging Face Transformers.

Importing it registers each family's LayerSkip config, base model and causal LM (Llama, Qwen2, Qwen3, Mistral,
Gemma 3 text, Phi-3) with the Auto classes, and marks them so that `save_pretrained` ships their code for
`trust_remote_code=True` loading.
"""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import *  # noqa: F403
from .modeling import FAMILIES
from .modeling import __all__ as _modeling_all

__version__ = "0.1.0"

for _config, _model, _causal_lm in FAMILIES.values():
    AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model)
    AutoModelForCausalLM.register(_config, _causal_lm)
    _config.register_for_auto_class()
    _model.register_for_auto_class("AutoModel")
    _causal_lm.register_for_auto_class("AutoModelForCausalLM")

# Loaded on first use, as trl exports its trainers: the trainer imports `transformers.Trainer`, which
# `import hf_layerskip` should not pay for.
_LAZY_EXPORTS = {"LayerSkipTrainer": ".trainer", "LayerSkipTrainingArguments": ".trainer"}


def __getattr__(name):
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY_EXPORTS])


__all__ = [*_modeling_all, *_LAZY_EXPORTS, "__version__"]
