"""Configuration of a Gemma 3 (text) model trained and decoded with the LayerSkip recipe (arXiv 2404.16710).

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from huggingface_hub.dataclasses import strict
from transformers import Gemma3TextConfig

from .configuration_layerskip import LayerSkipConfigMixin


@strict
class LayerSkipGemma3TextConfig(LayerSkipConfigMixin, Gemma3TextConfig):
    r"""A [`Gemma3TextConfig`] plus the LayerSkip settings of [`LayerSkipConfigMixin`]."""

    model_type = "layerskip_gemma3_text"

    # Override: LayerSkip drafts token by token, left to right; bidirectional attention has no early exit to draft with.
    def _validate_layerskip(self):
        super()._validate_layerskip()
        if self.use_bidirectional_attention:
            raise ValueError("LayerSkip needs causal attention, got use_bidirectional_attention=True.")


__all__ = ["LayerSkipGemma3TextConfig"]
