"""The batch's lookup planner against its formulas, and batched decoding with it against plain greedy."""

import pytest
import torch
from test_self_speculative import agreeing_model
from test_self_speculative_batch import PAD, padded_batch

from hf_layerskip.modeling import round_planning
from hf_layerskip.modeling.round_planning import LookupPlanner

pytestmark = pytest.mark.usefixtures("one_thread")


def test_expected_tokens_follow_the_measured_acceptance():
    planner = LookupPlanner()
    # Prior: one accepted and one rejected token, p = 1/2 for every match length.
    assert planner.expected_tokens([(2, 3), (0, 0)]) == pytest.approx((1 + 0.5 + 0.25 + 0.125) + 1)
    # After a 1-token match, 4 tokens reached and 1 accepted (the first, then a rejection): p_1 = 2 / 6.
    planner.record_lookup_round([(1, 4)], accepted=[1], width=5, seconds=1.0)
    assert planner.reached == {1: 2} and planner.accepted == {1: 1}
    assert planner.acceptance(1) == pytest.approx(2 / 4)
    # The second row's accepted padding does not count.
    planner.record_lookup_round([(1, 2), (3, 2)], accepted=[0, 4], width=3, seconds=1.0)
    assert planner.reached == {1: 3, 3: 2} and planner.accepted == {1: 1, 3: 2}
    p1, p3 = 2 / 5, 3 / 4
    assert planner.expected_tokens([(1, 2), (3, 1)]) == pytest.approx(1 + p1 + p1**2 + 1 + p3)


def test_measures_the_full_width_then_the_other_kind_then_picks_the_fastest_per_second():
    planner = LookupPlanner(smoothing=0.5)
    matches = [(2, 4), (1, 4)]
    assert planner.lookup_width(matches) == 5  # never measured: the whole lookup
    planner.record_lookup_round(matches, accepted=[0, 0], width=5, seconds=2.0)
    assert planner.lookup_width(matches) == 1  # then the other kind, once
    assert planner.lookup_width([(2, 2), (1, 1)]) == 3  # another full width is measured on its own
    planner.record_other_round(rows=2, tokens=2, seconds=1.0)
    p = 1 / 3  # both match lengths: one token reached and rejected, on top of the prior

    def rate(width, seconds):
        return planner.expected_tokens(matches, width - 1) / seconds

    # Unmeasured widths cost a straight line from the other kind's 1 s (width 1) to the full width's 2 s (width 5).
    rates = {1: 2 / 1.0, **{width: rate(width, 1.0 + (width - 1) / 4) for width in range(2, 6)}}
    assert planner.expected_tokens(matches, 1) == pytest.approx(2 * (1 + p))
    assert planner.lookup_width(matches) == max(rates, key=rates.get) == 2  # one looked-up token
    planner.record_other_round(rows=2, tokens=2, seconds=5.0)  # averaged: 3 s per round
    assert planner.other_rounds[2] == (2.0, 3.0)
    rates = {1: 2 / 3.0, **{width: rate(width, 3.0 + (2.0 - 3.0) * (width - 1) / 4) for width in range(2, 6)}}
    assert planner.lookup_width(matches) == max(rates, key=rates.get) == 5
    planner.record_lookup_round(matches, accepted=[0, 0], width=2, seconds=0.1)  # a measured width wins on its own
    assert planner.lookup_width(matches) == 2
    assert planner.lookup_width([(2, 4)] * 3) == 5  # 3 rows: not measured yet


def test_round_planning_module_imports_only_the_standard_library():
    source = open(round_planning.__file__).read()
    assert "import torch" not in source and "from transformers" not in source


def _generate_pair(model, input_ids, attention_mask=None):
    kwargs = dict(attention_mask=attention_mask, do_sample=False, max_new_tokens=30, pad_token_id=PAD)
    plain = model.generate(input_ids, **kwargs)
    return plain, model.generate(input_ids, assistant_early_exit=2, prompt_lookup_num_tokens=3, **kwargs)


LENGTHS = [7, 4, 6]


def test_declined_lookups_decode_as_plain_greedy(monkeypatch):
    """Rounds that decline their lookup draft with the early exit instead, or look up fewer tokens: every row still
    decodes as plain greedy."""
    decisions = []

    def alternating(self, matches):
        """The whole lookup, none, then one token, in turn."""
        width = [1 + max(length for _, length in matches), 1, 2][len(decisions) % 3]
        decisions.append(width)
        return width

    monkeypatch.setattr(LookupPlanner, "lookup_width", alternating)
    torch.manual_seed(0)
    model = agreeing_model()
    plain, speculative = _generate_pair(model, **padded_batch(LENGTHS))
    assert torch.equal(speculative, plain)
    assert 1 in decisions and any(width > 2 for width in decisions)
    assert model.speculation_stats.lookup_rounds == sum(width > 1 for width in decisions)  # each decision taken


def test_planned_batch_decodes_as_plain_greedy():
    torch.manual_seed(0)
    plain, speculative = _generate_pair(agreeing_model(), **padded_batch(LENGTHS))
    assert torch.equal(speculative, plain)


def test_one_row_looks_up_unplanned(monkeypatch):
    def unexpected(self, matches):
        raise AssertionError("one row is not planned")

    monkeypatch.setattr(LookupPlanner, "lookup_width", unexpected)
    model = agreeing_model()
    plain, speculative = _generate_pair(model, padded_batch(LENGTHS[:1])["input_ids"])
    assert torch.equal(speculative, plain)
    assert model.speculation_stats.lookup_rounds > 0
