"""The default model as users get it: SmolLM2 with the shipped LayerSkip adapter merged in (fp32)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.defaults import DEFAULT_ADAPTER_DIR, SETTINGS_FILE_NAME
from hf_layerskip.generation import load_humaneval

pytestmark = pytest.mark.real_model

HELD_OUT = (124, 143, 163)
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def default_model(smollm2_default_checkpoint):
    model = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_default_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_default_checkpoint)


def test_adapter_is_merged_as_peft_applies_it(default_model, smollm2_checkpoint):
    from peft import PeftModel

    model, tokenizer = default_model
    base = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, DEFAULT_ADAPTER_DIR).eval()
    input_ids = tokenizer("def fibonacci(n):\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, adapted(input_ids).logits, atol=1e-3, rtol=1e-3)
    settings = json.loads((DEFAULT_ADAPTER_DIR / SETTINGS_FILE_NAME).read_text())
    assert {name: getattr(model.config, name) for name in settings} == settings
    assert model.generation_config.num_assistant_tokens == model.config.num_speculations


@pytest.mark.parametrize("problem", HELD_OUT)
def test_self_speculative_equals_plain_greedy_at_the_shipped_settings(default_model, problem):
    model, tokenizer = default_model
    (example,) = load_humaneval([problem])
    input_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    plain = model.generate(input_ids, **greedy)
    ours = model.generate(input_ids, assistant_early_exit=model.config.exit_layer, **greedy)
    assert torch.equal(ours, plain)
    assert model.speculation_stats.accepted_tokens > 0
