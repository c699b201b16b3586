"""Every `generate` feature stock `LlamaForCausalLM` accepts, on our model: plain and self-speculative decoding give
stock Llama's tokens (and hidden states) on the same weights. What self-speculative decoding cannot do raises a
`ValueError` naming it (see test_self_speculative.py)."""

import pytest
import torch
from test_self_speculative import agreeing_model, prompt
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TopKLogitsWarper
from transformers.generation import WatermarkingConfig

from hf_layerskip.generation import plain_llama_view

pytestmark = pytest.mark.usefixtures("one_thread")


class StopAfterSum(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -2:].sum(dim=-1) > 150


# Each changes greedy output, or is a sampling warper set so that it leaves one token: sampling is then deterministic
# and comparable token for token.
FEATURES = {
    "suppress_tokens": dict(suppress_tokens=[71, 58, 103]),
    "begin_suppress_tokens": dict(begin_suppress_tokens=[71]),
    "forced_eos_token_id": dict(forced_eos_token_id=5, max_new_tokens=9),
    "sequence_bias": dict(sequence_bias={(103, 35): -10.0, (62,): -5.0}),
    "bad_words_ids": dict(bad_words_ids=[[103, 35], [42]]),
    "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.3),
    "remove_invalid_values": dict(remove_invalid_values=True),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=7),
    "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.5),
    "min_length": dict(min_length=15, eos_token_id=103),
    "watermarking_config": dict(watermarking_config=WatermarkingConfig()),
    "prefill_chunk_size": dict(prefill_chunk_size=4),
    "low_memory": dict(low_memory=True),
    "logits_processor": dict(logits_processor=LogitsProcessorList([TopKLogitsWarper(5)]), repetition_penalty=1.5),
    "stopping_criteria": dict(stopping_criteria=StoppingCriteriaList([StopAfterSum()]), max_new_tokens=30),
    "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda batch, ids: list(range(int(ids[-1]) % 3, 128, 3))),
    "max_time": dict(max_time=600.0),
    "pad_token_id": dict(pad_token_id=0),  # the prompt holds a 0: generate infers a padding mask from it
    "min_p": dict(do_sample=True, min_p=1.0),
    "epsilon_cutoff": dict(do_sample=True, epsilon_cutoff=0.5),
    "typical_p": dict(do_sample=True, typical_p=1e-6),
    "top_k": dict(do_sample=True, top_k=1, temperature=0.7),
}


@pytest.fixture(scope="module")
def models():
    ours = agreeing_model()
    return ours, plain_llama_view(ours)


@pytest.mark.parametrize("name", FEATURES)
@pytest.mark.parametrize("exit_layer, num_speculations", [(2, 4), (4, 2)])
def test_feature_gives_stock_llamas_tokens(models, name, exit_layer, num_speculations):
    ours, stock = models
    input_ids = prompt(10, seed=3)
    settings = {"max_new_tokens": 16, "do_sample": False, **FEATURES[name]}
    expected = stock.generate(input_ids, **settings)
    plain = ours.generate(input_ids, **settings)
    speculative = ours.generate(
        input_ids, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations, **settings
    )
    assert torch.equal(plain, expected)
    assert torch.equal(speculative, expected)
    if name == "stopping_criteria":
        assert expected.shape[1] < input_ids.shape[1] + settings["max_new_tokens"], "the criterion should stop early"


# On a batch every feature holds too, except the two a batch rejects (see test_self_speculative_batch.py): the
# stopping criterion needs an eos there, which it gets here.
UNSUPPORTED_ON_A_BATCH = {"prefix_allowed_tokens_fn"}


@pytest.mark.parametrize("name", [name for name in FEATURES if name not in UNSUPPORTED_ON_A_BATCH])
def test_feature_gives_stock_llamas_tokens_on_a_batch(models, name):
    ours, stock = models
    lengths = torch.tensor([10, 4, 7])
    rows = [prompt(int(length), seed=3 + int(length))[0] for length in lengths]
    width = int(lengths.max())
    input_ids = torch.stack([torch.cat([row.new_full((width - len(row),), 1), row]) for row in rows])
    attention_mask = (torch.arange(width) >= width - lengths[:, None]).long()  # left padding
    settings = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": 100, "pad_token_id": 1, **FEATURES[name]}
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    expected = stock.generate(**batch, **settings)
    speculative = ours.generate(**batch, assistant_early_exit=2, num_assistant_tokens=4, **settings)
    assert torch.equal(speculative, expected)


def test_the_features_change_the_output(models):
    """So that the table above cannot pass by ignoring them."""
    ours, _ = models
    input_ids = prompt(10, seed=3)
    unchanged = ours.generate(input_ids, max_new_tokens=16, do_sample=False)
    keeps_greedy = {"max_time", "prefill_chunk_size", "low_memory", "remove_invalid_values"}
    keeps_greedy |= {"min_p", "epsilon_cutoff", "top_k"}  # warpers that leave the top token
    for name, settings in FEATURES.items():
        output = ours.generate(input_ids, **{"max_new_tokens": 16, "do_sample": False, **settings})
        assert torch.equal(output, unchanged) == (name in keeps_greedy), name


@pytest.mark.parametrize("selection", [[0, -1], 3])
def test_selected_hidden_states_match_stock(models, selection):
    ours, stock = models
    input_ids = prompt(7, seed=5)
    settings = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_hidden_states=selection)
    expected = stock.generate(input_ids, **settings)
    speculative = ours.generate(input_ids, assistant_early_exit=2, num_assistant_tokens=4, **settings)
    assert torch.equal(speculative.sequences, expected.sequences)
    for ours_step, stock_step in zip(speculative.hidden_states, expected.hidden_states, strict=True):
        assert [state is None for state in ours_step] == [state is None for state in stock_step]
        for ours_state, stock_state in zip(ours_step, stock_step):
            if stock_state is not None:
                torch.testing.assert_close(ours_state, stock_state, atol=1e-4, rtol=1e-4)
