"""Transformers' own `assistant_early_exit` path on the same weights, as the reference to beat."""

from transformers import LlamaConfig, LlamaForCausalLM

from ..modeling import LayerSkipLlamaForCausalLM


def plain_llama_view(model: LayerSkipLlamaForCausalLM) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` that shares `model`'s parameters (no copy).

    Its `generate(assistant_early_exit=E)` runs transformers' `EarlyExitCandidateGenerator`, which keeps a second
    KV cache for the draft and verifies with all layers.
    """
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    llama = LlamaForCausalLM(LlamaConfig(**settings)).to(device=model.device, dtype=model.dtype)
    llama.load_state_dict(model.state_dict(), assign=True)
    llama.tie_weights()
    llama.generation_config = model.generation_config
    return llama.eval()
