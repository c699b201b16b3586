"""Each strategy against its reference: lossless ones against plain greedy, early exit against a manual loop."""

import pytest
import torch

from hf_layerskip.generation.strategies import Strategy, StrategyRunner, standard_strategies

PROMPT = torch.tensor([[5, 17, 42, 9, 77, 3, 60]])
NEW_TOKENS = 12


def manual_early_exit(model, input_ids, exit_layer, new_tokens):
    """Greedy decoding without a cache: each step reruns the first `exit_layer` layers on the whole sequence."""
    ids = input_ids
    for _ in range(new_tokens):
        logits = model(input_ids=ids, exit_layer=exit_layer, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, input_ids.shape[1] :]


def test_lossless_strategies_equal_plain_greedy_and_count_rounds(model):
    runner = StrategyRunner(model)
    plain = runner.run(Strategy("plain"), PROMPT, NEW_TOKENS)
    assert len(plain.new_tokens) == NEW_TOKENS and plain.seconds > 0 and plain.rounds is None
    ours = runner.run(Strategy("self_speculative", 2, 3), PROMPT, NEW_TOKENS)
    builtin = runner.run(Strategy("builtin", 2, 3), PROMPT, NEW_TOKENS)
    for record in (ours, builtin):
        assert torch.equal(record.new_tokens, plain.new_tokens)
        # Every round yields its accepted drafts plus one token of the full model.
        assert record.accepted_tokens + record.rounds == NEW_TOKENS
        assert record.accepted_tokens <= record.drafted_tokens <= 3 * record.rounds
    # Both draft greedily with the same exit, so they agree on what was accepted.
    assert (builtin.rounds, builtin.accepted_tokens) == (ours.rounds, ours.accepted_tokens)


def test_early_exit_equals_a_manual_shallow_loop(model):
    record = StrategyRunner(model).run(Strategy("early_exit", 3), PROMPT, NEW_TOKENS)
    assert torch.equal(record.new_tokens, manual_early_exit(model, PROMPT, 3, NEW_TOKENS))


def test_builtin_view_shares_weights_and_counts_each_call_afresh(model):
    runner = StrategyRunner(model)
    first = runner.run(Strategy("builtin", 4, 2), PROMPT, NEW_TOKENS)
    second = runner.run(Strategy("builtin", 4, 2), PROMPT, NEW_TOKENS)
    assert (first.rounds, first.drafted_tokens, first.accepted_tokens) == (
        second.rounds,
        second.drafted_tokens,
        second.accepted_tokens,
    )
    assert runner.builtin_model.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_strategy_validation_and_names():
    assert [s.name for s in standard_strategies(["plain", "early_exit", "self_speculative", "builtin"], 8, 2)] == [
        "plain",
        "early_exit(E=8)",
        "self_speculative(E=8,d=2)",
        "builtin(E=8,d=2)",
    ]
    assert [s.lossless for s in standard_strategies(["plain", "early_exit", "builtin"], 8, 2)] == [True, False, True]
    with pytest.raises(ValueError, match="Unknown strategy 'medusa'"):
        Strategy("medusa")
    with pytest.raises(ValueError, match="needs an exit layer"):
        Strategy("early_exit")
    with pytest.raises(ValueError, match="needs a number of speculations"):
        Strategy("builtin", 4)
