"""Batched throughput: padding, grouping, EOS cuts, the tokens/s arithmetic and the measured runs on a tiny model."""

import math

import pytest
import torch
from conftest import tiny_model
from measure_helpers import prompt_words, tiny_tokenizer
from transformers import GenerationConfig

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.generation.throughput import (
    STRATEGIES,
    GroupDecoder,
    GroupRun,
    Speculation,
    consecutive_groups,
    cut_at_eos,
    eos_token_ids,
    interleaved_schedule,
    left_pad,
    median_run,
    resolve_pad_token_id,
    run_throughput,
    summarize_throughput,
    throughput_table,
)

# Prompts of different lengths, so that a batch needs padding.
PROMPTS = [
    torch.tensor([[5, 17, 42, 9, 77, 3, 60]]),
    torch.tensor([[8, 6, 31]]),
    torch.tensor([[20, 21, 22, 23, 24]]),
    torch.tensor([[90, 14]]),
    torch.tensor([[44, 45, 46, 47, 48, 49]]),
]
NEW_TOKENS = 8
SPECULATION = Speculation(exit_layer=2, num_speculations=2)
PAD = 0


def test_left_pad_matches_the_tokenizers_left_padding():
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token, tokenizer.padding_side = "<unk>", "left"
    texts = [prompt_words(0, 7), prompt_words(1, 3), prompt_words(2, 5)]
    expected = tokenizer(texts, padding=True, return_tensors="pt")
    input_ids, attention_mask = left_pad([tokenizer(t, return_tensors="pt").input_ids for t in texts], 0)
    assert torch.equal(input_ids, expected.input_ids) and torch.equal(attention_mask, expected.attention_mask)
    assert attention_mask.sum(dim=1).tolist() == [7, 3, 5]


def test_consecutive_groups_keep_the_order_and_end_with_the_rest():
    assert consecutive_groups(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert consecutive_groups(list(range(4)), 4) == [[0, 1, 2, 3]]
    assert consecutive_groups(list(range(3)), 8) == [[0, 1, 2]]


def test_all_batch_sizes_move_through_the_prompts_together():
    assert interleaved_schedule(5, [1, 2, 4]) == [
        (1, 0, 0), (2, 0, 0), (4, 0, 0), (1, 1, 1), (1, 2, 2), (2, 1, 2), (1, 3, 3), (1, 4, 4), (2, 2, 4), (4, 1, 4)
    ]  # fmt: skip
    assert interleaved_schedule(3, [8]) == [(8, 0, 0)]


def test_a_row_ends_at_its_first_eos():
    row = torch.tensor([4, 9, 2, 7, 2, 2])
    assert cut_at_eos(row, (2,)).tolist() == [4, 9, 2]
    assert cut_at_eos(row, (7, 9)).tolist() == [4, 9]
    assert cut_at_eos(row, (5,)).tolist() == row.tolist()
    assert cut_at_eos(row, ()).tolist() == row.tolist()


def test_eos_and_pad_ids_from_the_generation_config_then_the_tokenizer():
    tokenizer = tiny_tokenizer()  # no pad token
    assert eos_token_ids(GenerationConfig()) == ()
    assert eos_token_ids(GenerationConfig(eos_token_id=2)) == (2,)
    assert eos_token_ids(GenerationConfig(eos_token_id=[2, 5])) == (2, 5)
    assert resolve_pad_token_id(GenerationConfig(eos_token_id=[7, 5], pad_token_id=3), tokenizer) == 3
    assert resolve_pad_token_id(GenerationConfig(eos_token_id=[7, 5]), tokenizer) == 7
    assert resolve_pad_token_id(GenerationConfig(), tokenizer) == 0
    tokenizer.pad_token = "w3"
    assert resolve_pad_token_id(GenerationConfig(eos_token_id=7), tokenizer) == tokenizer.pad_token_id == 5


def rows(*lengths: int, token: int = 1) -> list[torch.LongTensor]:
    return [torch.full((n,), token) for n in lengths]


def test_summaries_follow_the_definitions():
    """Two batch sizes over 3 prompts, figures computed by hand."""
    runs = {
        (1, "plain"): [GroupRun(rows(4), 2.0, 100 * 2**20), GroupRun(rows(2), 1.0), GroupRun(rows(3), 1.0)],
        (1, "self_speculative"): [
            GroupRun(rows(4), 1.0, None, 4, 3),
            GroupRun(rows(2), 0.5, None, 2, 0),
            GroupRun(rows(3), 0.5, None, 2, 1),
        ],
        (2, "plain"): [GroupRun(rows(4, 2), 1.5, 200 * 2**20), GroupRun(rows(3), 0.5, 300 * 2**20)],
        # A row that differs from plain's (token 7) and one shorter than plain's: two mismatches.
        (2, "self_speculative"): [
            GroupRun([*rows(4), *rows(2, token=7)], 1.0, None, 6, 2),
            GroupRun(rows(2), 1.0, None, 2, 2),
        ],
        (2, "self_speculative_loop"): [GroupRun(rows(4, 2), 2.0, None, 6, 4), GroupRun(rows(3), 2.0, None, 2, 2)],
    }
    summaries = {(s.batch_size, s.strategy): s for s in summarize_throughput(runs)}
    assert list(summaries) == [(1, "plain"), (1, "self_speculative"), (2, "plain"), (2, "self_speculative"),
                               (2, "self_speculative_loop")]  # fmt: skip
    plain_1, plain_2 = 9 / 4.0, 9 / 2.0
    expected = {  # new tokens, seconds, acceptance rate, peak MiB, mismatches
        (1, "plain"): (9, 4.0, None, 100, 0),
        (1, "self_speculative"): (9, 2.0, 4 / 8, None, 0),
        (2, "plain"): (9, 2.0, None, 300, 0),
        (2, "self_speculative"): (8, 2.0, 4 / 8, None, 2),
        (2, "self_speculative_loop"): (9, 4.0, 6 / 8, None, 0),
    }
    for (batch_size, strategy), (new_tokens, seconds, acceptance, peak, mismatches) in expected.items():
        summary = summaries[batch_size, strategy]
        rate = new_tokens / seconds
        assert (summary.new_tokens, summary.seconds, summary.mismatches) == (new_tokens, seconds, mismatches)
        assert summary.rows == 3 and summary.groups == math.ceil(3 / batch_size)
        assert summary.tokens_per_s == pytest.approx(rate)
        assert summary.speedup_vs_plain == pytest.approx(rate / (plain_1 if batch_size == 1 else plain_2))
        assert summary.speedup_vs_plain_batch_1 == pytest.approx(rate / plain_1)
        assert summary.acceptance_rate == (None if acceptance is None else pytest.approx(acceptance))
        assert summary.peak_memory_mib == (None if peak is None else pytest.approx(peak))
    # Without batch size 1 there is nothing to compare with at B=1.
    (summary,) = summarize_throughput({(2, "plain"): runs[2, "plain"]})
    assert summary.speedup_vs_plain == pytest.approx(1.0) and summary.speedup_vs_plain_batch_1 is None
    table = throughput_table(list(summaries.values())).splitlines()
    assert len(table) == 7
    assert table[5] == "| 2 | self_speculative | 8 | 2.00 | 4.0 | 0.89 | 1.78 | 0.500 | – | 2/3 |"


def greedy_rows(model, prompts, eos_id) -> list[list[int]]:
    """Each prompt's plain greedy continuation, decoded on its own and cut after its first `eos_id`."""
    continuations = []
    for input_ids in prompts:
        output = model.generate(input_ids, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
        continuations.append(cut_at_eos(output[0, input_ids.shape[1] :], (eos_id,)).tolist())
    return continuations


@pytest.fixture
def model_with_eos(one_thread) -> LayerSkipLlamaForCausalLM:
    """The tiny model, with an EOS it produces in the middle of the first prompt's continuation, so that the rows of a
    batch end at different lengths."""
    model = tiny_model()
    first = model.generate(PROMPTS[0], do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    model.generation_config.eos_token_id = int(first[0, PROMPTS[0].shape[1] + 2])
    return model


def count_generate_calls(monkeypatch) -> list[tuple[tuple[int, int], int | None]]:
    """Records each `generate` call's input shape and assistant_early_exit."""
    calls = []
    generate = LayerSkipLlamaForCausalLM.generate

    def counting(self, input_ids, **kwargs):
        calls.append((tuple(input_ids.shape), kwargs.get("assistant_early_exit")))
        return generate(self, input_ids, **kwargs)

    monkeypatch.setattr(LayerSkipLlamaForCausalLM, "generate", counting)
    return calls


def test_each_strategy_decodes_a_group_as_plain_greedy_decoding_does(model_with_eos, monkeypatch):
    eos_id = model_with_eos.generation_config.eos_token_id
    expected = greedy_rows(model_with_eos, PROMPTS[:1], eos_id)
    assert len(expected[0]) == 3  # the EOS ends the row early
    decoder = GroupDecoder(model_with_eos, NEW_TOKENS, SPECULATION, PAD)
    calls = count_generate_calls(monkeypatch)
    for strategy in STRATEGIES:
        run = decoder.run(strategy, PROMPTS[:1])
        assert [row.tolist() for row in run.rows] == expected and run.seconds > 0
        if strategy == "plain":
            assert run.drafted_tokens is None and run.accepted_tokens is None
        else:
            assert 0 <= run.accepted_tokens <= run.drafted_tokens and run.drafted_tokens > 0
    assert calls == [((1, 7), None), ((1, 7), 2), ((1, 7), 2)]
    with pytest.raises(ValueError, match="Unknown strategy 'medusa'"):
        decoder.run("medusa", PROMPTS[:1])


def test_batch_size_1_runs_every_prompt_with_every_strategy_interleaved(model_with_eos, monkeypatch):
    eos_id = model_with_eos.generation_config.eos_token_id
    expected = greedy_rows(model_with_eos, PROMPTS[:3], eos_id)
    calls = count_generate_calls(monkeypatch)
    result = run_throughput(model_with_eos, PROMPTS[:3], [1], NEW_TOKENS, SPECULATION, PAD, progress=False)
    # One warm-up group, then the strategy order rotates from group to group.
    assert [exit_layer for _, exit_layer in calls] == [None, 2, 2] + [None, 2, 2] + [2, 2, None] + [2, None, 2]
    assert [s.strategy for s in result.summaries] == list(STRATEGIES)
    for summary in result.summaries:
        assert summary.batch_size == 1 and summary.rows == summary.groups == 3
        assert summary.new_tokens == sum(map(len, expected)) and summary.mismatches == 0
        assert summary.speedup_vs_plain == pytest.approx(summary.speedup_vs_plain_batch_1)
    # At batch size 1 the batched and the looped self-speculative calls are the same calls.
    assert result.summaries[1].acceptance_rate == result.summaries[2].acceptance_rate
    assert [g["new_tokens"] for g in result.groups if g["strategy"] == "plain"] == [[len(r)] for r in expected]
    assert result.settings["eos_token_ids"] == [eos_id] and result.settings["warmup_groups"] == 1
    assert (result.settings["exit_layer"], result.settings["num_speculations"]) == (2, 2)


def test_the_warm_up_runs_the_first_groups_unmeasured(model, monkeypatch):
    calls = count_generate_calls(monkeypatch)
    result = run_throughput(model, PROMPTS[:2], [1], 2, SPECULATION, PAD, warmup=2, progress=False)
    assert calls[:6] == [((1, 7), None), ((1, 7), 2), ((1, 7), 2), ((1, 3), None), ((1, 3), 2), ((1, 3), 2)]
    assert len(calls) == 12 and result.settings["warmup_groups"] == 2
    calls.clear()
    run_throughput(model, PROMPTS[:2], [1], 2, SPECULATION, PAD, warmup=0, progress=False)
    assert len(calls) == 6


def test_a_batch_decodes_every_row_as_plain_greedy_decoding_does(model_with_eos, monkeypatch):
    eos_id = model_with_eos.generation_config.eos_token_id
    group = PROMPTS[:3]
    expected = greedy_rows(model_with_eos, group, eos_id)
    assert len(expected[0]) == 3 < NEW_TOKENS  # the first row finishes before the others
    decoder = GroupDecoder(model_with_eos, NEW_TOKENS, SPECULATION, PAD)
    calls = count_generate_calls(monkeypatch)
    for strategy in STRATEGIES:
        run = decoder.run(strategy, group)
        assert [row.tolist() for row in run.rows] == expected
    # Batched calls get the left-padded group; the loop gets each prompt as it is.
    assert calls == [((3, 7), None), ((3, 7), 2), ((1, 7), 2), ((1, 3), 2), ((1, 5), 2)]


def test_every_batch_size_and_strategy_yields_plain_greedy_rows(model_with_eos, monkeypatch):
    eos_id = model_with_eos.generation_config.eos_token_id
    expected = greedy_rows(model_with_eos, PROMPTS, eos_id)
    calls = count_generate_calls(monkeypatch)
    result = run_throughput(model_with_eos, PROMPTS, [3, 1, 2], NEW_TOKENS, SPECULATION, PAD, progress=False)
    assert calls[:3] == [((1, 7), None), ((1, 7), 2), ((1, 7), 2)]  # the warm-up group is one of the smallest B
    # Then groups in the order of their first prompt, the strategy order rotating group by group within a batch size.
    assert calls[3:9] == [((1, 7), None), ((1, 7), 2), ((1, 7), 2), ((2, 7), None), ((2, 7), 2), ((1, 7), 2)]
    assert calls[9:13] == [((1, 3), 2), ((3, 7), None), ((3, 7), 2), ((1, 7), 2)]
    assert [(s.batch_size, s.strategy) for s in result.summaries] == [(b, s) for b in (1, 2, 3) for s in STRATEGIES]
    for summary in result.summaries:
        assert summary.groups == math.ceil(5 / summary.batch_size) and summary.rows == 5
        assert summary.new_tokens == sum(map(len, expected)) and summary.mismatches == 0
        assert summary.speedup_vs_plain_batch_1 is not None and summary.tokens_per_s > 0
        if summary.strategy != "plain":
            assert 0 <= summary.acceptance_rate <= 1
    # The loop makes the same batch-1 calls whatever the batch size.
    loop_rates = {s.acceptance_rate for s in result.summaries if s.strategy == "self_speculative_loop"}
    assert len(loop_rates) == 1
    for batch_size in (1, 2, 3):
        for strategy in STRATEGIES:
            groups = [g for g in result.groups if (g["batch_size"], g["strategy"]) == (batch_size, strategy)]
            assert [g["first_prompt"] for g in groups] == list(range(0, 5, batch_size))
            assert [n for g in groups for n in g["new_tokens"]] == list(map(len, expected))


def test_each_group_repeats_every_strategy_in_turn_and_its_median_run_counts(model, monkeypatch):
    calls = count_generate_calls(monkeypatch)
    result = run_throughput(model, PROMPTS[:1], [1], 2, SPECULATION, PAD, warmup=0, progress=False, repeats=3)
    assert calls == [((1, 7), None), ((1, 7), 2), ((1, 7), 2)] * 3
    assert result.settings["repeats"] == 3 and all(summary.groups == 1 for summary in result.summaries)


def test_the_median_run_is_the_middle_one_by_seconds():
    runs = [GroupRun([], seconds) for seconds in (3.0, 1.0, 2.0, 9.0)]
    assert median_run(runs[:3]).seconds == 2.0
    assert median_run(runs).seconds == 3.0
