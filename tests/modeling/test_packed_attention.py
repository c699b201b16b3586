"""Packed grouped-query attention against stock `sdpa` attention, and the switch that self-speculative decoding uses."""

import pytest
import torch
from conftest import tiny_config
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.modeling.packed_attention import PACKED_SDPA, packed_gqa_attention, packed_sdpa_attention


class Grouped(torch.nn.Module):
    """What the attention functions read from a layer's attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("query_length", [1, 2, 5])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_packed_attention_equals_stock_sdpa(groups, query_length, mask_kind):
    torch.manual_seed(0)
    batch_size, key_value_heads, key_length, head_dim = 3, 2, 11, 16
    query = torch.randn(batch_size, query_length, key_value_heads * groups, head_dim).transpose(1, 2)  # as a layer's
    key = torch.randn(batch_size, key_value_heads, key_length, head_dim)
    value = torch.randn(batch_size, key_value_heads, key_length, head_dim)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(batch_size, 1, query_length, key_length) > 0.4  # holes and padding anywhere
        mask[..., -1] = True
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = Grouped(groups)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    actual, weights = packed_sdpa_attention(module, query, key, value, mask, scaling=0.25)
    assert weights is None
    assert actual.shape == expected.shape == (batch_size, query_length, key_value_heads * groups, head_dim)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_switch_applies_to_sdpa_only_and_restores_on_error():
    model = LayerSkipLlamaForCausalLM(tiny_config())
    model.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with packed_gqa_attention(model):
            assert model.config._attn_implementation == PACKED_SDPA
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with packed_gqa_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"


def test_inference_attends_packed_and_training_stock_with_the_same_logits(monkeypatch):
    """`run_layers` packs where gradients are off (with `sdpa`'s masks, so padding stays masked) and keeps stock
    `sdpa` for training; both give the same logits over several positions of a padded batch."""
    torch.manual_seed(0)
    model = LayerSkipLlamaForCausalLM(tiny_config()).eval()
    model.config._attn_implementation = "sdpa"
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])  # the query length
        return packed_sdpa_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, PACKED_SDPA, counting)
    input_ids = torch.randint(0, 128, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    training = model(input_ids=input_ids, attention_mask=attention_mask).logits  # gradients on: stock `sdpa`
    assert calls == [] and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        inference = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert calls == [7] * model.config.num_hidden_layers and model.config._attn_implementation == "sdpa"
    kept = attention_mask.bool()
    torch.testing.assert_close(inference[kept], training.detach()[kept], rtol=1e-5, atol=1e-5)
