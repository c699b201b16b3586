"""ROUGE-L, mismatch positions, peak memory and per-strategy summaries against direct computations."""

import math
import statistics

import pytest
import torch

from hf_layerskip.generation.metrics import (
    PeakMemory,
    first_mismatch,
    markdown_table,
    memory_method,
    reference_perplexity,
    rouge_l,
    summarize,
    touch_fresh_pages,
)
from hf_layerskip.generation.strategies import GenerationRecord, Strategy


def lcs_length(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("the cat sat on the mat", "the cat lay on a mat"),
        ("a b c d", "d c b a"),
        ("x y", "p q r"),
        ("one two", "one two"),
    ],
)
def test_rouge_l_is_the_lcs_f_measure(prediction, reference):
    p, r = prediction.split(), reference.split()
    lcs = lcs_length(p, r)
    expected = 0.0 if lcs == 0 else 2 * (lcs / len(p)) * (lcs / len(r)) / (lcs / len(p) + lcs / len(r))
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_first_mismatch():
    a = torch.tensor([1, 2, 3, 4])
    assert first_mismatch(a, a.clone()) is None
    assert first_mismatch(a, torch.tensor([1, 2, 9, 4])) == 2
    assert first_mismatch(a, torch.tensor([1, 2])) == 2
    assert first_mismatch(torch.tensor([5]), torch.tensor([6, 7])) == 0


def resident_bytes() -> int:
    (line,) = [line for line in open("/proc/self/status") if line.startswith("VmRSS:")]
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(memory_method(torch.device("cpu")) != "rss_peak", reason="needs a Linux VmHWM that /proc/self/clear_refs resets")
def test_cpu_peak_memory_sees_a_temporary_allocation():
    size = 64 * 2**20
    with PeakMemory(torch.device("cpu")) as large:
        before = resident_bytes()
        touch_fresh_pages(size)  # new pages: freed memory the process still holds cannot serve them
    with PeakMemory(torch.device("cpu")) as small:
        before_small = resident_bytes()
        torch.ones(16)
    assert large.peak_bytes >= before + 0.9 * size
    assert small.peak_bytes < before_small + 0.5 * size


def record(tokens, seconds, rounds=None, drafted=None, accepted=None):
    return GenerationRecord(torch.tensor(tokens), seconds, rounds, drafted, accepted)


def test_summary_follows_the_definitions():
    plain = [record([1, 2, 3, 4], 2.0), record([5, 6], 1.0)]
    speculative = [record([1, 2, 3, 4], 1.0, 2, 4, 2), record([5, 7], 0.8, 2, 4, 0)]
    strategy = Strategy("self_speculative", 3, 2)
    plain_ms = 1000 * 3.0 / 6
    summary = summarize(strategy, speculative, plain, [100 * 2**20, None], [0.5, 0.7], plain_ms)
    assert summary.new_tokens == 6 and summary.seconds == pytest.approx(1.8)
    assert summary.tokens_per_s_mean == pytest.approx(statistics.fmean([4 / 1.0, 2 / 0.8]))
    assert summary.tokens_per_s_median == pytest.approx(statistics.median([4 / 1.0, 2 / 0.8]))
    assert summary.ms_per_token == pytest.approx(1000 * 1.8 / 6)
    assert summary.speedup == pytest.approx(plain_ms / (1000 * 1.8 / 6))
    assert summary.acceptance_rate == pytest.approx(2 / 8)
    assert summary.tokens_per_round == pytest.approx(6 / 4)
    assert summary.mean_accepted_per_round == pytest.approx(2 / 4)
    assert summary.peak_memory_mib == pytest.approx(100)
    assert summary.rouge_l == pytest.approx(0.6)
    assert summary.mismatches == 1
    table = markdown_table([summary]).splitlines()
    assert len(table) == 3 and table[2].startswith("| self_speculative(E=3,d=2) |") and "1/2" in table[2]
    plain_summary = summarize(Strategy("plain"), plain, plain, [None, None], [], plain_ms)
    assert plain_summary.speedup == pytest.approx(1.0) and plain_summary.mismatches == 0
    assert plain_summary.acceptance_rate is None and plain_summary.rouge_l is None


def test_reference_perplexity_scores_only_the_references_tokens(one_thread):
    from conftest import tiny_model
    from test_conversion import tiny_tokenizer

    from hf_layerskip.generation.data import PromptExample

    model, tokenizer = tiny_model(vocab_size=128), tiny_tokenizer()
    examples = [PromptExample("a", "w1 w2 w3", " w4 w5"), PromptExample("b", "w9", " w10 w11 w12")]
    losses, counts = [], []
    for example in examples:
        input_ids = tokenizer(example.prompt + example.reference, return_tensors="pt")["input_ids"]
        labels = input_ids.clone()
        prompt_length = len(tokenizer(example.prompt)["input_ids"])
        labels[0, :prompt_length] = -100  # transformers' own loss over the reference tokens only
        with torch.no_grad():
            losses.append(float(model(input_ids, labels=labels).loss))
        counts.append(input_ids.shape[1] - prompt_length)
    pooled = sum(loss * count for loss, count in zip(losses, counts)) / sum(counts)
    assert reference_perplexity(model, tokenizer, examples) == pytest.approx(math.exp(pooled), rel=1e-5)
