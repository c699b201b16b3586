"""Property test: self-speculative greedy decoding equals plain greedy decoding token for token on tiny random
models, over depths 2-8, every exit layer E, draft lengths 1-8, prompts of 1-64 tokens (random, or a repeated
chunk, where lookup drafting finds matches), lookup drafting off or on (1-6 tokens, n-grams of 1-3), an eos inside
the output or none, and grouped-query versus plain multi-head attention; a few examples again over a static cache. A
divergence is excused only where plain greedy's top-2
score gap is below 1e-4 (a numerical tie); each is reported as a warning."""

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_self_speculative import compare_with_plain, plain_greedy

# Examples drawn and (model, prompt, E, d) comparisons required, per cache kind; the static cache's run is a short
# second look (its layers and masks have the full length; the rest of the decoder is shared).
EXAMPLES = {None: (100, 300), "static": (25, 60)}


@st.composite
def decoding_problems(draw):
    num_layers = draw(st.integers(2, 8))
    max_new_tokens = draw(st.integers(1, 24))
    return dict(
        num_layers=num_layers,
        num_key_value_heads=draw(st.sampled_from([1, 2, 4])),  # of 4 query heads: 4 is plain multi-head attention
        # How much the layers after the first change the residual stream: 0 makes every exit agree with the model.
        deep_scale=draw(st.sampled_from([1.0, 0.3, 0.0])),
        seed=draw(st.integers(0, 2**16)),
        prompt_length=draw(st.integers(1, 64)),
        # A prompt made of one chunk repeated, or random tokens.
        repeated_chunk=draw(st.none() | st.integers(1, 8)),
        lookup_tokens=draw(st.sampled_from([None, 1, 3, 6])),
        lookup_ngram_size=draw(st.integers(1, 3)),
        max_new_tokens=max_new_tokens,
        # One draft length per exit layer E = 1..L-1.
        num_speculations=draw(st.lists(st.integers(1, 8), min_size=num_layers - 1, max_size=num_layers - 1)),
        # Which new token of plain greedy decoding becomes the eos, if any.
        eos_at=draw(st.none() | st.integers(0, max_new_tokens - 1)),
    )


def build_model(problem):
    model = tiny_model(
        problem["seed"], num_hidden_layers=problem["num_layers"], num_key_value_heads=problem["num_key_value_heads"]
    )
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(problem["deep_scale"])
            layer.mlp.down_proj.weight.mul_(problem["deep_scale"])
    return model


def problem_prompt(problem, vocab_size: int) -> torch.LongTensor:
    """`(1, prompt_length)`: random tokens, or one random chunk repeated (lookup drafting then finds matches)."""
    generator = torch.Generator().manual_seed(problem["seed"])
    chunk_length = problem["repeated_chunk"] or problem["prompt_length"]
    chunk = torch.randint(0, vocab_size, (1, chunk_length), generator=generator)
    return chunk.repeat(1, -(-problem["prompt_length"] // chunk_length))[:, : problem["prompt_length"]]


@pytest.mark.parametrize("cache_implementation", EXAMPLES)
def test_greedy_equals_plain_greedy_property(one_thread, cache_implementation):
    cases, ties = [], []
    lookup_rounds = []  # per case
    num_examples, required_cases = EXAMPLES[cache_implementation]

    @settings(max_examples=num_examples, deadline=None, derandomize=True)
    @given(decoding_problems())
    def check(problem):
        model = build_model(problem)
        input_ids = problem_prompt(problem, model.config.vocab_size)
        common = dict(max_new_tokens=problem["max_new_tokens"])
        plain = plain_greedy(model, input_ids, **common)
        if problem["eos_at"] is not None:
            eos = int(plain.sequences[0, problem["prompt_length"] + problem["eos_at"]])
            common.update(eos_token_id=eos, pad_token_id=eos)
            plain = plain_greedy(model, input_ids, **common)
            assert plain.sequences[0, -1] == eos
        for exit_layer, num_speculations in enumerate(problem["num_speculations"], start=1):
            ours = model.generate(
                input_ids,
                do_sample=False,
                assistant_early_exit=exit_layer,
                num_assistant_tokens=num_speculations,
                prompt_lookup_num_tokens=problem["lookup_tokens"],
                max_matching_ngram_size=problem["lookup_ngram_size"],
                cache_implementation=cache_implementation,
                **common,
            )
            lookup_rounds.append(model.speculation_stats.lookup_rounds)
            tie = compare_with_plain(plain, ours, problem["prompt_length"])
            if tie is not None:
                ties.append({**problem, "exit_layer": exit_layer, **tie})
            cases.append((problem["seed"], exit_layer, num_speculations))

    check()
    print(f"{len(cases)} cases ({sum(lookup_rounds)} lookup rounds), {len(ties)} numerical ties excused: {ties}")
    assert len(cases) >= required_cases, len(cases)
    assert sum(lookup_rounds) >= required_cases, sum(lookup_rounds)  # lookup drafting ran, not only switched on
