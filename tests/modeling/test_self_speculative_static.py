"""Self-speculative decoding over a `StaticCache` (`cache_implementation="static"` or a passed cache) against plain
greedy decoding over the default dynamic cache, single rows and batches: drafts are written at their slots and
rejected ones overwritten, rows leave the batch, holes are compacted in place, every layer processes each position
once, and a returned static cache continues a conversation."""

import pytest
import torch
from conftest import compare_rows_with_plain, tiny_model
from test_self_speculative import agreeing_model, assert_same_as_plain, plain_greedy, positions_per_layer, prompt
from test_self_speculative_batch import BATCH_LENGTHS, PAD, assert_batch_same_as_plain, eos_of_first_row, padded_batch
from transformers import StaticCache

from hf_layerskip.modeling import self_speculative

NUM_LAYERS = 6
STATIC = dict(cache_implementation="static")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 3), (2, 6), (5, 1)])
def test_greedy_equals_plain_with_a_static_cache(model, exit_layer, num_speculations):
    input_ids = prompt(10, seed=31)
    plain = assert_same_as_plain(model, input_ids, exit_layer, num_speculations, max_new_tokens=25, **STATIC)
    assert torch.equal(plain.sequences, plain_greedy(model, input_ids, max_new_tokens=25).sequences)


def test_drafts_are_accepted_and_rejected_on_a_static_cache(agreeing):
    input_ids = prompt(7, seed=32)
    settings = dict(max_new_tokens=40, return_dict_in_generate=True)
    plain = plain_greedy(agreeing, input_ids, **settings)
    ours = agreeing.generate(input_ids, assistant_early_exit=2, num_assistant_tokens=5, **settings, **STATIC)
    compare_rows_with_plain(plain, ours.sequences, input_ids.shape[1])
    assert 0 < ours.accepted_tokens < ours.drafted_tokens
    assert isinstance(ours.cache, StaticCache)
    # The write position is where plain decoding's is: rejected drafts were rewound, not kept.
    assert [int(ours.cache.get_seq_length(i)) for i in range(NUM_LAYERS)] == [ours.sequences.shape[1] - 1] * NUM_LAYERS


@pytest.mark.parametrize("exit_layer, num_speculations", [(2, 4), (4, 2)])
def test_a_batch_whose_rows_leave_on_a_static_cache(agreeing, exit_layer, num_speculations):
    """Rows finish at different lengths (eos) and leave: the static layers are narrowed to the remaining rows."""
    batch = padded_batch(BATCH_LENGTHS, seed=7)
    eos = eos_of_first_row(agreeing, batch, new_token=2)
    ours = assert_batch_same_as_plain(
        agreeing, batch, exit_layer, num_speculations, max_new_tokens=30, eos_token_id=eos, **STATIC
    )
    assert ours.rounds[0] < ours.rounds.max()


def test_holes_are_compacted_in_place_on_a_static_cache(agreeing, monkeypatch):
    """Compaction moves each row's kept entries to the front of the fixed-size layers (0.05: nearly every round)."""
    monkeypatch.setattr(self_speculative, "_COMPACT_AT_HOLE_FRACTION", 0.05)
    monkeypatch.setattr(self_speculative, "_MIN_SLOTS_TO_COMPACT", 1)
    compactions = []
    original = self_speculative.SelfSpeculativeDecoder._compact
    monkeypatch.setattr(
        self_speculative.SelfSpeculativeDecoder,
        "_compact",
        lambda decoder: compactions.append(decoder.filled) or original(decoder),
    )
    assert_batch_same_as_plain(agreeing, padded_batch([8, 3, 6, 8], seed=8), 2, 6, max_new_tokens=60, **STATIC)
    assert len(compactions) > 1


def test_a_full_static_cache_is_compacted_before_it_overflows(agreeing, monkeypatch):
    """Holes never reach the sparse threshold here; a passed cache of exactly `max_length - 1` positions fills up
    with them, and is compacted when a round's slots would not fit."""
    monkeypatch.setattr(self_speculative, "_MIN_SLOTS_TO_COMPACT", 10**6)
    compactions = []
    original = self_speculative.SelfSpeculativeDecoder._compact
    monkeypatch.setattr(
        self_speculative.SelfSpeculativeDecoder,
        "_compact",
        lambda decoder: compactions.append(decoder.filled) or original(decoder),
    )
    batch = padded_batch([8, 3, 6, 8], seed=8)
    max_new_tokens = 60
    cache = StaticCache(config=agreeing.config, max_cache_len=batch["input_ids"].shape[1] + max_new_tokens - 1)
    plain = plain_greedy(agreeing, **batch, max_new_tokens=max_new_tokens, pad_token_id=PAD)
    ours = agreeing.generate(
        **batch, max_new_tokens=max_new_tokens, pad_token_id=PAD, assistant_early_exit=2, num_assistant_tokens=6,
        cache=cache,
    )
    compare_rows_with_plain(plain, ours, batch["input_ids"].shape[1])
    assert compactions, "the cache should have been compacted when full"


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 3), (4, 2)])
def test_each_layer_processes_each_position_once_on_a_static_cache(exit_layer, num_speculations):
    """Layers E..L-1 are identities, so every draft is accepted: each layer processes each position once, as in
    plain greedy decoding (without compiled steps nothing is padded)."""
    model = tiny_model(seed=1)
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    for inputs in [dict(input_ids=prompt(11, seed=18)), padded_batch(BATCH_LENGTHS, seed=9)]:
        settings = dict(max_new_tokens=21, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
        outputs = {}
        layers = model.model.layers
        plain_counts = positions_per_layer(
            layers, lambda: outputs.__setitem__("plain", model.generate(**inputs, **settings))
        )
        ours_counts = positions_per_layer(
            layers,
            lambda: outputs.__setitem__(
                "ours",
                model.generate(
                    **inputs,
                    assistant_early_exit=exit_layer,
                    num_assistant_tokens=num_speculations,
                    **settings,
                    **STATIC,
                ),
            ),
        )
        assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
        assert torch.all(outputs["ours"].acceptance_rate == 1.0)
        total_length = outputs["plain"].sequences.shape[1]
        assert plain_counts == [inputs["input_ids"].shape[0] * (total_length - 1)] * NUM_LAYERS
        assert ours_counts == plain_counts


def test_a_returned_static_cache_continues_the_conversation(agreeing):
    speculative = dict(assistant_early_exit=2, num_assistant_tokens=4)
    turn_one = prompt(8, seed=23)
    cache = StaticCache(config=agreeing.config, max_cache_len=64)
    first = agreeing.generate(turn_one, max_new_tokens=12, cache=cache, return_dict_in_generate=True, **speculative)
    conversation = torch.cat([first.sequences, prompt(5, seed=24)], dim=1)
    ours = agreeing.generate(conversation, max_new_tokens=16, cache=first.cache, **speculative)
    compare_rows_with_plain(plain_greedy(agreeing, conversation, max_new_tokens=16), ours, conversation.shape[1])
    compare_rows_with_plain(plain_greedy(agreeing, turn_one, max_new_tokens=12), first.sequences, turn_one.shape[1])
    assert int(cache.get_seq_length()) == ours.shape[1] - 1
