"""Self-speculative decoding over a static cache on the converted SmolLM2-135M-Instruct (fp32), on held-out HumanEval
problems 124-126: each prompt alone, and the three as one left-padded batch, token for token equal to plain greedy
decoding over the default dynamic cache (numerical ties excused, as in `compare_rows_with_plain`)."""

import pytest
import torch
from conftest import compare_rows_with_plain
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval

pytestmark = pytest.mark.real_model

PROMPTS = range(124, 127)
MAX_NEW_TOKENS = 32
# The base model accepts drafts often only near the top (see "Choosing E and d").
SPECULATIVE = dict(assistant_early_exit=28, num_assistant_tokens=3, cache_implementation="static")


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    model = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint, padding_side="left")
    return model, tokenizer


def test_static_cache_equals_plain_greedy_on_held_out_problems(smollm2, one_thread):
    model, tokenizer = smollm2
    texts = [example.prompt for example in load_humaneval(PROMPTS)]
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    recorded = dict(return_dict_in_generate=True, output_scores=True)
    for text in texts:
        inputs = tokenizer(text, return_tensors="pt")
        plain = model.generate(**inputs, **settings, **recorded)
        ours = model.generate(**inputs, **settings, **SPECULATIVE, return_dict_in_generate=True)
        compare_rows_with_plain(plain, ours.sequences, inputs.input_ids.shape[1])
        assert ours.accepted_tokens > 0
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    plain = model.generate(**batch, **settings, **recorded)
    ours = model.generate(**batch, **settings, **SPECULATIVE)
    compare_rows_with_plain(plain, ours, batch.input_ids.shape[1])
