"""The measurement functions on the converted SmolLM2-135M-Instruct (slow tier)."""

import pytest
import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import check_correctness, layer_quality, load_humaneval, load_texts, tokenize_texts

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    model = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_checkpoint).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_checkpoint)


def test_self_speculative_greedy_matches_plain_on_humaneval(smollm2):
    model, tokenizer = smollm2
    prompts = load_humaneval(range(2))
    encoded = [tokenizer(p.prompt, return_tensors="pt").input_ids for p in prompts]
    checks = check_correctness(model, [p.id for p in prompts], encoded, [(8, 2), (24, 3)], 16, progress=False)
    assert [c.mismatch_position for c in checks] == [None] * 4


def test_early_layers_rarely_agree_with_the_last(smollm2):
    model, tokenizer = smollm2
    sequences = tokenize_texts(tokenizer, load_texts("humaneval", limit=4), max_length=256)
    rows = layer_quality(model, sequences, progress=False)
    agreement = torch.tensor([r.top1_agreement for r in rows])
    assert agreement[-1] == 1.0
    # The untrained checkpoint's exits: rare agreement in the first third, much more just below the top.
    assert agreement[:10].mean() < 0.2 < agreement[-4:-1].mean()
    assert rows[-1].perplexity < min(r.perplexity for r in rows[:-1])
