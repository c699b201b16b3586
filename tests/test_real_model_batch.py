"""Batched self-speculative decoding on SmolLM2-135M-Instruct (fp32): 16 HumanEval prompts in left-padded batches of
4 and 8, two (E, d) pairs, 32 new tokens; every row equals plain batched greedy decoding's row token for token. A
divergence is excused only where plain greedy's top-2 score gap for that row is below 1e-4 (a numerical tie), and
reported as a warning. The default model (with its draft head) at its shipped settings, on one batch, too."""

import pytest
import torch
from conftest import compare_rows_with_plain
from transformers import AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation import load_humaneval

pytestmark = pytest.mark.real_model

NUM_PROMPTS = 16
PAIRS = ((12, 3), (24, 6))  # (E, d)
MAX_NEW_TOKENS = 32


def load(checkpoint):
    model = LayerSkipLlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return load(smollm2_checkpoint)


@pytest.fixture(scope="module")
def prompts():
    return [example.prompt for example in load_humaneval(range(NUM_PROMPTS))]


def check_batch(model, tokenizer, texts, **speculation):
    """Plain batched greedy once (with its scores, to tell ties), then ours with each setting in `speculation`."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad)
    assert (batch["attention_mask"] == 0).any(), "the prompts should need padding"
    plain = model.generate(**batch, **greedy, return_dict_in_generate=True, output_scores=True)
    for settings in speculation.values():
        ours = model.generate(**batch, **greedy, **settings, return_dict_in_generate=True)
        compare_rows_with_plain(plain, ours.sequences, batch["input_ids"].shape[1])
        assert int(ours.accepted_tokens.sum()) > 0


@pytest.mark.parametrize(
    "batch_size, group", [(batch_size, group) for batch_size in (4, 8) for group in range(NUM_PROMPTS // batch_size)]
)
def test_each_row_equals_plain_batched_greedy(smollm2, prompts, batch_size, group):
    model, tokenizer = smollm2
    texts = prompts[group * batch_size : (group + 1) * batch_size]
    pairs = {f"E={e},d={d}": dict(assistant_early_exit=e, num_assistant_tokens=d) for e, d in PAIRS}
    check_batch(model, tokenizer, texts, **pairs)


def test_the_default_model_on_a_batch_at_its_shipped_settings(smollm2_default_checkpoint, prompts):
    model, tokenizer = load(smollm2_default_checkpoint)
    shipped = dict(assistant_early_exit=model.config.exit_layer)  # d and the threshold come with the checkpoint
    check_batch(model, tokenizer, prompts[:4], shipped=shipped)
