"""The analytic bound: closed form against the sum it abbreviates and against simulated rounds."""

import random

import pytest
import torch

from hf_layerskip.generation.speedup_bound import (
    StepCosts,
    expected_tokens_per_round,
    fit_acceptance,
    measure_step_costs,
    speedup_bound,
)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 0.999, 1.0])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_closed_form_equals_the_geometric_sum(alpha, d):
    assert expected_tokens_per_round(alpha, d) == pytest.approx(sum(alpha**i for i in range(d + 1)))


def test_closed_form_matches_simulated_rounds():
    rng = random.Random(0)
    alpha, d, rounds = 0.6, 4, 50_000
    tokens = 0
    for _ in range(rounds):
        accepted = 0
        while accepted < d and rng.random() < alpha:
            accepted += 1
        tokens += accepted + 1
    assert tokens / rounds == pytest.approx(expected_tokens_per_round(alpha, d), rel=0.01)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.65, 1.0])
def test_fit_acceptance_inverts_the_mean(alpha):
    d = 3
    mean_accepted = expected_tokens_per_round(alpha, d) - 1
    assert fit_acceptance(mean_accepted, d) == pytest.approx(alpha, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        fit_acceptance(3.5, d)


def test_bound_combines_costs_and_acceptance():
    costs = StepCosts(full=1.0, draft=0.25, verify=1.2)
    bound = speedup_bound(costs, exit_layer=8, num_speculations=2, mean_accepted_per_round=1.0, measured_speedup=1.1)
    alpha = fit_acceptance(1.0, 2)
    ideal = expected_tokens_per_round(alpha, 2) / ((2 * 0.25 + 1.2) / 1.0)
    assert bound.ideal_speedup == pytest.approx(ideal)
    assert bound.fraction_of_ideal == pytest.approx(1.1 / ideal)
    assert (bound.draft_cost_ratio, bound.verify_cost_ratio) == pytest.approx((0.25, 1.2))


def test_measured_step_costs_are_positive_and_leave_the_model_usable(model):
    input_ids = torch.arange(3, 23)[None]
    reference = model.generate(input_ids, do_sample=False, max_new_tokens=5)
    costs = measure_step_costs(model, input_ids, exit_layer=2, num_speculations=3, repeats=3)
    assert costs.full > 0 and costs.draft > 0 and costs.verify > 0
    assert torch.equal(model.generate(input_ids, do_sample=False, max_new_tokens=5), reference)


def test_step_costs_time_the_decoders_own_draft_and_verify(model, monkeypatch):
    from hf_layerskip.modeling.self_speculative import SelfSpeculativeDecoder

    calls = {"draft_step": [], "verify": []}
    for name in calls:
        original = getattr(SelfSpeculativeDecoder, name)

        def counted(self, *args, _original=original, _name=name):
            result = _original(self, *args)
            calls[_name].append(result)
            return result

        monkeypatch.setattr(SelfSpeculativeDecoder, name, counted)
    repeats, num_speculations = 3, 2
    measure_step_costs(model, torch.arange(3, 23)[None], exit_layer=2, num_speculations=num_speculations, repeats=repeats)
    # One warm-up call each; every verification after a real round of d drafts.
    assert len(calls["verify"]) == repeats + 1
    assert len(calls["draft_step"]) == (repeats + 1) * (1 + num_speculations)
    assert all(hidden.shape == (1, num_speculations + 1, 64) for hidden in calls["verify"])
