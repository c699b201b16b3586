"""Configuration of a Phi-3 model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import Phi3Config

from .configuration_layerskip import LayerSkipConfigMixin


@strict
class LayerSkipPhi3Config(LayerSkipConfigMixin, Phi3Config):
    r"""A [`Phi3Config`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_phi3"


__all__ = ["LayerSkipPhi3Config"]
