"""Configuration of a Mistral model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig

from .configuration_layerskip import LayerSkipConfigMixin


@strict
class LayerSkipMistralConfig(LayerSkipConfigMixin, MistralConfig):
    r"""A [`MistralConfig`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_mistral"


__all__ = ["LayerSkipMistralConfig"]
