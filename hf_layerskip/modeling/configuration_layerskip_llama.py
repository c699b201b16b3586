"""Configuration of a Llama model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .configuration_layerskip import (  # noqa: F401  (re-exported: the settings' one home is configuration_layerskip)
    DRAFT_HEAD_FIELDS,
    EARLY_EXIT_CURRICULA,
    EARLY_EXIT_LAYER_WEIGHTINGS,
    LAYER_DROPOUT_SCALES,
    LAYERSKIP_FIELDS,
    LayerSkipConfigMixin,
    _check_choice,
    _check_range,
)


@strict
class LayerSkipLlamaConfig(LayerSkipConfigMixin, LlamaConfig):
    r"""A [`LlamaConfig`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_llama"


__all__ = ["LayerSkipLlamaConfig", "LAYERSKIP_FIELDS", "DRAFT_HEAD_FIELDS"]
