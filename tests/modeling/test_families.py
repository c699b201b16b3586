"""Every family against its stock transformers class with the same weights (logits with and without exit, cached
decoding past the sliding windows, plain generation), and self-speculative decoding against plain greedy decoding
per family: a property test over E, d, prompt lengths, eos inside the output and left-padded batches; the layer
counts; exact sampling on Gemma 3."""

import pytest
import torch
from conftest import (
    ALL_FAMILIES,
    OTHER_FAMILIES,
    compare_rows_with_plain,
    scale_residual_branches,
    stock_copy,
    tiny_config,
    tiny_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_self_speculative import plain_greedy, positions_per_layer
from test_self_speculative_batch import PAD, padded_batch
from test_self_speculative_sampling import (
    NUM_SAMPLES_WRONG_RULE,
    VOCAB_SIZE,
    chi_square_p_value,
    exact_joint,
    sample_first_two,
)
from torch.testing import assert_close

NUM_LAYERS = 6

pytestmark = pytest.mark.usefixtures("one_thread")


def stock_exit_logits(stock, hidden_states):
    """The stock model's final norm and LM head on a layer's output, soft-capped as its forward caps logits."""
    logits = stock.lm_head(stock.model.norm(hidden_states))
    cap = getattr(stock.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.fixture
def batch():
    """Three rows of 12 tokens, the second left-padded by 4: longer than every sliding window (4)."""
    return padded_batch([12, 8, 11], seed=0)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_logits_and_exits_equal_the_stock_class(family, batch):
    model = tiny_model(family=family)
    stock = stock_copy(model)
    attended = batch["attention_mask"].bool()
    reference = stock(**batch, output_hidden_states=True)
    assert_close(model(**batch).logits[attended], reference.logits[attended], atol=1e-5, rtol=1e-5)
    for exit_layer in range(1, NUM_LAYERS):
        # hidden_states[E] is layer E's output before the norm (the last entry is replaced by the normed one).
        expected = stock_exit_logits(stock, reference.hidden_states[exit_layer])
        actual = model(**batch, exit_layer=exit_layer).logits
        assert_close(actual[attended], expected[attended], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_training_loss_without_dropout_equals_the_stock_class(family, batch):
    model = tiny_model(family=family, layer_dropout_max=0.0)
    stock = stock_copy(model)
    model.train(), stock.train()
    ours, expected = model(**batch, labels=batch["input_ids"]), stock(**batch, labels=batch["input_ids"])
    assert_close(ours.loss, expected.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_cached_decoding_past_the_window_equals_the_stock_class(family):
    model = tiny_model(family=family)
    stock = stock_copy(model)
    input_ids = torch.randint(0, 128, (2, 11))
    outputs = [model(input_ids[:, :6], use_cache=True)]
    for position in range(6, 11):
        outputs.append(model(input_ids[:, position : position + 1], cache=outputs[-1].cache))
    logits = torch.cat([output.logits for output in outputs], dim=1)
    assert_close(logits, stock(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_plain_and_early_exit_generate_equal_the_stock_class(family, batch):
    model = tiny_model(family=family)
    stock = stock_copy(model)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(**batch, **settings), stock.generate(**batch, **settings))
    early = model.generate(**batch, early_exit=3, **settings)
    # The stock model cut to its first 3 layers: what early exit at 3 decodes with.
    stock.model.layers = stock.model.layers[:3]
    stock.config.num_hidden_layers = 3
    if getattr(stock.config, "layer_types", None) is not None:
        stock.config.layer_types = stock.config.layer_types[:3]
    assert torch.equal(early, stock.generate(**batch, **settings))


# Self-speculative decoding equals plain greedy decoding: per family, a property test on left-padded batches.


@st.composite
def batch_problems(draw):
    max_new_tokens = draw(st.integers(1, 16))
    batch_size = draw(st.integers(1, 4))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        # How much the layers after the first change the residual stream: 0 makes every exit agree with the model.
        deep_scale=draw(st.sampled_from([1.0, 0.3, 0.0])),
        prompt_lengths=draw(st.lists(st.integers(1, 16), min_size=batch_size, max_size=batch_size)),
        max_new_tokens=max_new_tokens,
        num_speculations=draw(st.lists(st.integers(1, 6), min_size=NUM_LAYERS - 1, max_size=NUM_LAYERS - 1)),
        # Which new token of the first row's plain greedy output becomes the eos, if any.
        eos_at=draw(st.none() | st.integers(0, max_new_tokens - 1)),
    )


NUM_EXAMPLES = 6  # per family, each decoding at every exit layer


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_greedy_equals_plain_greedy_property(family):
    cases, ties = [], []

    @settings(max_examples=NUM_EXAMPLES, deadline=None, derandomize=True)
    @given(batch_problems())
    def check(problem):
        model = tiny_model(problem["seed"], family=family)
        scale_residual_branches(model.model.layers[1:], problem["deep_scale"])
        batch = padded_batch(problem["prompt_lengths"], seed=problem["seed"])
        prompt_length = batch["input_ids"].shape[1]
        common = dict(max_new_tokens=problem["max_new_tokens"], pad_token_id=PAD)
        if problem["eos_at"] is not None:
            first_row = plain_greedy(model, **batch, **common).sequences[0]
            common["eos_token_id"] = int(first_row[prompt_length + problem["eos_at"]])
        plain = plain_greedy(model, **batch, **common)
        for exit_layer, num_speculations in enumerate(problem["num_speculations"], start=1):
            ours = model.generate(
                **batch, do_sample=False, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations, **common
            )
            for tie in compare_rows_with_plain(plain, ours, prompt_length):
                ties.append({**problem, "exit_layer": exit_layer, **tie})
            cases.append((len(problem["prompt_lengths"]), exit_layer, num_speculations))

    check()
    print(f"{family}: {len(cases)} cases, {len(ties)} numerical ties excused: {ties}")
    assert len(cases) == NUM_EXAMPLES * (NUM_LAYERS - 1)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_a_long_batch_past_the_window_with_holes(family):
    """Rows accept different numbers of drafts, leaving holes in the shared cache, for many rounds past the sliding
    window: the windows must count positions, not cache slots."""
    model = tiny_model(seed=2, family=family)
    scale_residual_branches(model.model.layers[1:], 0.3)
    batch = padded_batch([9, 3, 14], seed=5)
    common = dict(max_new_tokens=30, pad_token_id=PAD)
    plain = plain_greedy(model, **batch, **common)
    ours = model.generate(
        **batch, do_sample=False, assistant_early_exit=2, num_assistant_tokens=4, return_dict_in_generate=True, **common
    )
    compare_rows_with_plain(plain, ours.sequences, batch["input_ids"].shape[1])
    assert 0 < int(ours.accepted_tokens.sum()) < int(ours.drafted_tokens.sum()), "drafts should be both kept and not"


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_each_layer_processes_each_position_once(family):
    exit_layer, num_speculations = 2, 4
    model = tiny_model(seed=1, family=family)
    # Layers E..L-1 become exact identities (their residual branches output zeros): every draft is accepted.
    scale_residual_branches(model.model.layers[exit_layer:], 0.0)
    batch = padded_batch([11, 7], seed=18)
    settings = dict(max_new_tokens=17, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    outputs = {}
    layers = model.model.layers
    plain_counts = positions_per_layer(layers, lambda: outputs.__setitem__("plain", model.generate(**batch, **settings)))
    ours_counts = positions_per_layer(
        layers,
        lambda: outputs.__setitem__(
            "ours",
            model.generate(**batch, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations, **settings),
        ),
    )
    assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
    assert torch.equal(outputs["ours"].acceptance_rate, torch.ones(2))
    assert plain_counts == [2 * (outputs["plain"].sequences.shape[1] - 1)] * NUM_LAYERS
    assert ours_counts == plain_counts


def test_sampling_is_exact_on_gemma3():
    """The statistical test of `test_self_speculative_sampling` on a Gemma 3 model whose draft exit (layer 1) is a
    sliding-window layer of window 2 and whose last layer is global, with soft-capped logits."""
    model = tiny_model(
        seed=0,
        family="gemma3_text",
        vocab_size=VOCAB_SIZE,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=2,
        initializer_range=0.3,
    )
    draft = exact_joint(model, early_exit=1)
    full = exact_joint(model)
    assert (draft - full).abs().sum() > 0.2, "the draft should be far from the full model"
    # As many samples as reject a wrong acceptance rule on Llama: a Gemma 3 call costs about twice a Llama one.
    assert chi_square_p_value(sample_first_two(model, NUM_SAMPLES_WRONG_RULE), full) > 1e-3


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_each_family_config_validates_the_layerskip_settings(family):
    config = tiny_config(family, num_hidden_layers=4)
    assert config.exit_layer == 1 and config.layer_dropout_max == 0.1  # the shared defaults
    with pytest.raises(ValueError, match=r"`exit_layer` must be in \[1, 3\], got 4"):
        tiny_config(family, num_hidden_layers=4, exit_layer=4)


def test_gemma3_bidirectional_attention_is_rejected():
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        tiny_config("gemma3_text", use_bidirectional_attention=True)
