"""Transformers' own `assistant_early_exit` path on the same weights, as the reference to beat."""

import copy

import torch

from ..modeling import LayerSkipConfigMixin, LayerSkipForCausalLMMixin


def _stock_class(layerskip_class: type, mixin: type) -> type:
    """The stock transformers class a LayerSkip class mixes `mixin` into (`LayerSkipQwen2ForCausalLM` ->
    `Qwen2ForCausalLM`)."""
    return next(cls for cls in layerskip_class.__mro__ if cls is not mixin and not issubclass(cls, mixin))


def plain_llama_view(model):
    """The stock causal LM of `model`'s family (`LlamaForCausalLM` for Llama, `Qwen2ForCausalLM` for Qwen2, ...)
    sharing `model`'s parameters (no copy).

    Its `generate(assistant_early_exit=E)` runs transformers' `EarlyExitCandidateGenerator`, which keeps a second
    KV cache for the draft and verifies with all layers. That generator reads the draft length and confidence
    threshold from the view's own `generation_config`, not from the `generate` call: set
    `view.generation_config.num_assistant_tokens = d` there. The view's config is a copy, with the threshold at 0
    (a constant draft length, as ours).
    """
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = _stock_class(type(model.config), LayerSkipConfigMixin)(**settings)
    with torch.device("meta"):  # no memory and no initialisation: every tensor comes from `model`
        llama = _stock_class(type(model), LayerSkipForCausalLMMixin)(config)
    # The draft head (exit adapters, draft vocabulary) is ours alone: the built-in path drafts through the plain exit.
    weights = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("draft_head.")}
    llama.load_state_dict(weights, assign=True)
    for name, _ in llama.named_buffers():  # the rotary tables are not in the state dict
        module_name, _, buffer_name = name.rpartition(".")
        setattr(llama.get_submodule(module_name), buffer_name, model.get_buffer(name))
    llama.tie_weights()
    llama.generation_config = copy.deepcopy(model.generation_config)
    llama.generation_config.update(num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    return llama.eval()
