"""Decoding strategies, prompt sources and measurements around `generate`.

The self-speculative decoder itself lives in `hf_layerskip.modeling.self_speculative`, because everything
`generate()` needs travels with saved checkpoints as remote code.
"""

from .builtin import plain_llama_view
from .data import PromptExample, load_humaneval

__all__ = ["PromptExample", "load_humaneval", "plain_llama_view"]
