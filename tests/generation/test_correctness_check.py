"""The greedy correctness check: passes for the real decoder, catches a broken one, and measures the logit gap."""

import pytest
import torch

import hf_layerskip.modeling.self_speculative as self_speculative
from hf_layerskip.generation.correctness import check_correctness, logit_gap, tie_tolerance_for, unit_in_last_place

PROMPTS = [torch.tensor([[5, 17, 42, 9, 77]]), torch.tensor([[100, 3, 3, 8]])]
PAIRS = [(2, 1), (3, 4)]


def break_the_last_accepted_token(monkeypatch, vocab_size):
    """Makes greedy acceptance emit a wrong full-model token after each row's accepted drafts."""
    accept = self_speculative.accept_greedy_rows

    def broken(draft_tokens, target_scores):
        num_accepted, tokens = accept(draft_tokens, target_scores)
        tokens, rows = tokens.clone(), torch.arange(len(tokens))
        tokens[rows, num_accepted] = (tokens[rows, num_accepted] + 1) % vocab_size
        return num_accepted, tokens

    monkeypatch.setattr(self_speculative, "accept_greedy_rows", broken)


def test_real_decoder_passes(model):
    checks = check_correctness(model, ["a", "b"], PROMPTS, PAIRS, max_new_tokens=10, progress=False)
    assert [(c.prompt_id, c.exit_layer, c.num_speculations) for c in checks] == [
        ("a", 2, 1),
        ("a", 3, 4),
        ("b", 2, 1),
        ("b", 3, 4),
    ]
    assert all(c.passed and c.new_tokens == 10 for c in checks)


def test_broken_decoder_is_caught_at_its_first_wrong_token(model, monkeypatch):
    plain = model.generate(PROMPTS[0], do_sample=False, max_new_tokens=10)[0, PROMPTS[0].shape[1] :]
    break_the_last_accepted_token(monkeypatch, model.config.vocab_size)
    (check,) = check_correctness(model, ["a"], PROMPTS[:1], [(2, 1)], max_new_tokens=10, progress=False)
    assert not check.passed
    # The broken decoder's own output says where it first departs from plain greedy decoding.
    broken = model.generate(
        PROMPTS[0], do_sample=False, max_new_tokens=10, assistant_early_exit=2, num_assistant_tokens=1
    )
    differs = (broken[0, PROMPTS[0].shape[1] :] != plain).nonzero()
    assert check.mismatch_position == int(differs[0])
    assert check.plain_token == int(plain[check.mismatch_position])
    assert check.speculative_token == (check.plain_token + 1) % model.config.vocab_size
    assert check.logit_gap == pytest.approx(
        logit_gap(model, PROMPTS[0], plain, check.mismatch_position, check.speculative_token)
    )
    assert check.logit_gap > 1e-3 and check.is_tie is False


def test_logit_gap_is_read_from_the_full_model(model):
    plain = model.generate(PROMPTS[1], do_sample=False, max_new_tokens=4)[0, PROMPTS[1].shape[1] :]
    with torch.no_grad():
        prefix = torch.cat([PROMPTS[1], plain[None, :2]], dim=1)
        logits = model(input_ids=prefix).logits[0, -1]
    assert logit_gap(model, PROMPTS[1], plain, 2, 7) == pytest.approx(float(logits[plain[2]] - logits[7]), rel=1e-5)
    assert logit_gap(model, PROMPTS[1], plain, 2, int(plain[2])) == 0.0
    assert float(logits[plain[2]]) == pytest.approx(float(logits.max()))  # plain greedy took the argmax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("magnitude", [0.3, 1.0, 7.9, 20.0, -33.0])
def test_half_precision_ties_are_units_in_the_last_place(dtype, magnitude):
    """Against the dtype itself: the distance from a number to the next one up."""
    value = torch.tensor(abs(magnitude), dtype=dtype)
    spacing = float(torch.nextafter(value, torch.tensor(float("inf"), dtype=dtype)) - value)
    assert unit_in_last_place(dtype, magnitude) == spacing
    assert tie_tolerance_for(dtype, logit_magnitude=magnitude) == 2 * spacing
    assert tie_tolerance_for(dtype, 0.5, magnitude) == 0.5  # an explicit tolerance wins
