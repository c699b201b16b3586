"""Configuration of a Qwen3 model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config

from .configuration_layerskip import LayerSkipConfigMixin


@strict
class LayerSkipQwen3Config(LayerSkipConfigMixin, Qwen3Config):
    r"""A [`Qwen3Config`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_qwen3"


__all__ = ["LayerSkipQwen3Config"]
