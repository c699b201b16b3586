"""Configuration of a Qwen2 model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from .configuration_layerskip import LayerSkipConfigMixin


@strict
class LayerSkipQwen2Config(LayerSkipConfigMixin, Qwen2Config):
    r"""A [`Qwen2Config`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_qwen2"


__all__ = ["LayerSkipQwen2Config"]
