"""The default model as users get it: SmolLM2 as it is, plus the shipped draft head (fp32)."""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.defaults import DEFAULT_DRAFT_HEAD_DIR, SETTINGS_FILE_NAME
from hf_layerskip.generation import load_humaneval
from hf_layerskip.generation.correctness import find_mismatch

pytestmark = pytest.mark.real_model

HELD_OUT = (124, 143, 163)
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def default_model(smollm2_default_checkpoint):
    model = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_default_checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_default_checkpoint)


def test_the_weights_are_smollm2s_and_the_draft_head_is_the_shipped_one(default_model, smollm2_checkpoint):
    model, _ = default_model
    base = LayerSkipLlamaForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32)
    for name, tensor in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    settings = json.loads((DEFAULT_DRAFT_HEAD_DIR / SETTINGS_FILE_NAME).read_text())
    threshold = settings.pop("assistant_confidence_threshold", 0.0)
    assert {name: getattr(model.config, name) for name in settings} == settings
    assert model.generation_config.num_assistant_tokens == model.config.num_speculations
    assert model.generation_config.assistant_confidence_threshold == threshold
    assert str(model.config.exit_layer) in model.draft_head.adapters


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


BFLOAT16_PROBLEMS = (124, 128, 132, 136, 140, 144)


def test_bfloat16_parts_from_plain_only_at_near_ties(default_model):
    """In bfloat16 verification scores several positions in one pass, whose rounding differs from one position's:
    self-speculative output may part from plain bfloat16 greedy, but only where plain's top-2 logit gap is within
    bfloat16's rounding at that magnitude (two units in the last place). At such a tie either token is a correct
    rounding, so which of the two runs stays with float32 greedy longer is chance, problem by problem; how close each
    stays over all 40 held-out problems is measured by `benchmarks/bfloat16_agreement.py`."""
    model32, tokenizer = default_model
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    for example in load_humaneval(BFLOAT16_PROBLEMS):
        input_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
        plain = model16.generate(input_ids, **greedy)[0, input_ids.shape[1] :]
        speculative = model16.generate(input_ids, assistant_early_exit=model16.config.exit_layer, **greedy)
        mismatch = find_mismatch(model16, input_ids, plain, speculative[0, input_ids.shape[1] :])
        assert mismatch is None or mismatch.is_tie, (example.id, mismatch)
