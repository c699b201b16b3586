"""Batched self-speculative decoding (`generate` on a left-padded batch with `assistant_early_exit=E`) against plain
greedy decoding, row by row, on tiny random models: a property test over batch sizes, prompt lengths, E and d; generate
features on a batch; per-row counts; finished rows leaving; holes compacted; one shared cache (counted with hooks);
and what a batch does not support."""

import pytest
import torch
from conftest import compare_rows_with_plain, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_self_speculative import (
    agreeing_model,
    plain_greedy,
    positions_per_layer,
    two_letter_tokenizer,
)
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from hf_layerskip.modeling import self_speculative
from hf_layerskip.modeling.draft_head import ExitAdapter

NUM_LAYERS = 6  # of the tiny models
PAD = 0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


def padded_batch(lengths: list[int], seed: int = 0, vocab_size: int = 128) -> dict:
    """Random prompts of `lengths` tokens, left-padded with `PAD`: `input_ids` and `attention_mask`, each
    `(len(lengths), max(lengths))`. Prompt tokens avoid `PAD`."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, vocab_size, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    return dict(input_ids=input_ids * attention_mask, attention_mask=attention_mask)


def assert_batch_same_as_plain(model, batch, exit_layer, num_speculations, **settings):
    """Ours equals plain batched greedy under the same `settings`, row by row (ties excused); returns ours."""
    settings = {"pad_token_id": PAD, **settings}
    plain = plain_greedy(model, **batch, **settings)
    ours = model.generate(
        **batch,
        do_sample=False,
        assistant_early_exit=exit_layer,
        num_assistant_tokens=num_speculations,
        return_dict_in_generate=True,
        **settings,
    )
    compare_rows_with_plain(plain, ours.sequences, batch["input_ids"].shape[1])
    return ours


# Equivalence: a property test, then each row against itself decoded alone.


@st.composite
def batch_problems(draw):
    max_new_tokens = draw(st.integers(1, 24))
    batch_size = draw(st.integers(1, 6))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        # How much the layers after the first change the residual stream: 0 makes every exit agree with the model.
        deep_scale=draw(st.sampled_from([1.0, 0.3, 0.0])),
        prompt_lengths=draw(st.lists(st.integers(1, 40), min_size=batch_size, max_size=batch_size)),
        max_new_tokens=max_new_tokens,
        num_speculations=draw(st.lists(st.integers(1, 6), min_size=NUM_LAYERS - 1, max_size=NUM_LAYERS - 1)),
        # Lookup drafting off (the config's default) or on.
        lookup_tokens=draw(st.sampled_from([None, 2, 5])),
        # Which new token of the first row's plain greedy output becomes the eos, if any.
        eos_at=draw(st.none() | st.integers(0, max_new_tokens - 1)),
    )


# Examples per cache kind: the static cache's run is a short second look (its layers and masks have the full length;
# the rest of the decoder is shared).
NUM_EXAMPLES = {None: 60, "static": 15}


@pytest.mark.parametrize("cache_implementation", NUM_EXAMPLES)
def test_batched_greedy_equals_plain_batched_greedy_property(cache_implementation):
    cases, ties, lookup_rounds = [], [], []
    num_examples = NUM_EXAMPLES[cache_implementation]

    @settings(max_examples=num_examples, deadline=None, derandomize=True)
    @given(batch_problems())
    def check(problem):
        model = agreeing_model(problem["seed"], scale=problem["deep_scale"])
        batch = padded_batch(problem["prompt_lengths"], seed=problem["seed"])
        prompt_length = batch["input_ids"].shape[1]
        common = dict(max_new_tokens=problem["max_new_tokens"], pad_token_id=PAD)
        if problem["eos_at"] is not None:
            first_row = plain_greedy(model, **batch, **common).sequences[0]
            common["eos_token_id"] = int(first_row[prompt_length + problem["eos_at"]])
        plain = plain_greedy(model, **batch, **common)
        for exit_layer, num_speculations in enumerate(problem["num_speculations"], start=1):
            ours = model.generate(
                **batch,
                do_sample=False,
                assistant_early_exit=exit_layer,
                num_assistant_tokens=num_speculations,
                prompt_lookup_num_tokens=problem["lookup_tokens"],
                cache_implementation=cache_implementation,
                **common,
            )
            lookup_rounds.append(model.speculation_stats.lookup_rounds)
            for tie in compare_rows_with_plain(plain, ours, prompt_length):
                ties.append({**problem, "exit_layer": exit_layer, **tie})
            cases.append((len(problem["prompt_lengths"]), exit_layer, num_speculations))

    check()
    print(f"{len(cases)} cases ({sum(lookup_rounds)} lookup rounds), {len(ties)} numerical ties excused: {ties}")
    assert len(cases) == num_examples * (NUM_LAYERS - 1)
    assert sum(lookup_rounds) >= len(cases), sum(lookup_rounds)  # lookup drafting ran, not only switched on
    batch_sizes = {batch_size for batch_size, _, _ in cases}
    assert len(batch_sizes) >= 3, batch_sizes
    if cache_implementation is None:
        assert {1, 6} <= batch_sizes and len(batch_sizes) >= 5, batch_sizes


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 3), (3, 6)])
def test_each_row_equals_its_prompt_decoded_alone(agreeing, exit_layer, num_speculations):
    lengths = [3, 17, 1, 9]
    batch = padded_batch(lengths, seed=1)
    ours = agreeing.generate(
        **batch, max_new_tokens=20, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations
    )
    width = batch["input_ids"].shape[1]
    for row, length in enumerate(lengths):
        alone = batch["input_ids"][row : row + 1, width - length :]
        plain = plain_greedy(agreeing, alone, max_new_tokens=20)
        compare_rows_with_plain(plain, ours[row : row + 1, width - length :], length)


# Generate features on a batch. Rows stop at different tokens: an eos that one row emits early.

BATCH_LENGTHS = [10, 4, 12, 7]


def eos_of_first_row(model, batch, new_token: int = 3, **settings) -> int:
    """A token that plain greedy emits as the first row's `new_token`-th token."""
    sequences = plain_greedy(model, **batch, pad_token_id=PAD, max_new_tokens=new_token + 1, **settings).sequences
    return int(sequences[0, -1])


class StopAfterSum(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -2:].sum(dim=-1) > 200


BATCH_FEATURES = {
    "max_length": dict(max_length=30),
    "min_new_tokens": dict(min_new_tokens=9),
    "several_eos": dict(extra_eos=[5, 77]),
    "repetition_penalty": dict(repetition_penalty=1.5),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "stopping_criteria": dict(stopping_criteria=StoppingCriteriaList([StopAfterSum()])),
}


@pytest.mark.parametrize("name", BATCH_FEATURES)
@pytest.mark.parametrize("exit_layer, num_speculations", [(2, 4), (4, 2)])
def test_generate_feature_on_a_batch(agreeing, name, exit_layer, num_speculations):
    batch = padded_batch(BATCH_LENGTHS, seed=2)
    settings = dict(BATCH_FEATURES[name])
    if "max_length" not in settings:
        settings["max_new_tokens"] = 24
    eos = [eos_of_first_row(agreeing, batch), *settings.pop("extra_eos", [])]
    ours = assert_batch_same_as_plain(agreeing, batch, exit_layer, num_speculations, eos_token_id=eos, **settings)
    if name != "min_new_tokens":
        assert_first_row_finished_early(ours.sequences, batch["input_ids"].shape[1], eos)


def assert_first_row_finished_early(sequences, prompt_length: int, eos: list[int]):
    """The first row ends at an eos and is padded after it while another row goes on."""
    first = sequences[0, prompt_length:]
    end = int(torch.isin(first, torch.tensor(eos)).int().argmax())
    assert first[end] in eos and end + 1 < len(first), "the first row should finish early and the others go on"
    assert torch.all(first[end + 1 :] == PAD)


def test_stop_strings_on_a_batch(agreeing):
    tokenizer = two_letter_tokenizer()
    batch = padded_batch(BATCH_LENGTHS, seed=3)
    width = batch["input_ids"].shape[1]
    emitted = plain_greedy(agreeing, **batch, pad_token_id=PAD, max_new_tokens=24).sequences[1, width:].tolist()
    stop = tokenizer.decode(emitted[5:7])[1:3]  # spans new tokens 5 and 6 of the second row
    eos = eos_of_first_row(agreeing, batch, new_token=12)
    ours = assert_batch_same_as_plain(
        agreeing, batch, 2, 5, max_new_tokens=24, stop_strings=stop, tokenizer=tokenizer, eos_token_id=eos
    )
    assert stop in tokenizer.decode(ours.sequences[1, width:].tolist())


def median_draft_confidence(model, batch, exit_layer: int) -> float:
    """The median top probability of the draft's exit over the batch's real prompt positions: a confidence threshold
    there withholds about half the drafts."""
    with torch.no_grad():
        states = model.model(**batch, output_layer_hidden_states=True).layer_hidden_states[exit_layer - 1]
        confidence = model.draft_exit(exit_layer)(states).softmax(dim=-1).max(dim=-1).values
    return float(confidence[batch["attention_mask"].bool()].median())


@pytest.mark.parametrize("exit_layer, num_speculations", [(2, 4), (4, 2)])
def test_confidence_threshold_on_a_batch(agreeing, exit_layer, num_speculations):
    batch = padded_batch(BATCH_LENGTHS, seed=11)
    threshold = median_draft_confidence(agreeing, batch, exit_layer)
    ours = assert_batch_same_as_plain(
        agreeing, batch, exit_layer, num_speculations, max_new_tokens=24, assistant_confidence_threshold=threshold
    )
    # Rounds draft fewer than d tokens, but draft.
    assert 0 < int(ours.drafted_tokens.sum()) < num_speculations * int(ours.rounds.sum())


def test_a_draft_head_on_a_batch(agreeing):
    """A draft vocabulary and an exit adapter change the drafts, never the output."""
    torch.manual_seed(4)
    adapter = ExitAdapter(agreeing.config.hidden_size)
    with torch.no_grad():
        adapter.up.normal_(std=0.01)
    batch = padded_batch(BATCH_LENGTHS, seed=5)
    emitted = plain_greedy(agreeing, **batch, pad_token_id=PAD, max_new_tokens=20).sequences.unique()
    # Most of the emitted ids (so that drafts are accepted) and a few others.
    vocab = torch.cat([emitted[::2], torch.tensor([i for i in range(128) if i not in emitted][:8])])
    drafting = agreeing_model()
    drafting.set_draft_head({2: adapter}, vocab)
    for threshold in (0.0, median_draft_confidence(drafting, batch, 2)):
        ours = assert_batch_same_as_plain(
            drafting, batch, 2, 4, max_new_tokens=20, assistant_confidence_threshold=threshold
        )
        assert 0 < int(ours.accepted_tokens.sum()) < int(ours.drafted_tokens.sum())


# Per-row counts, finished rows, holes.


def test_per_row_counts(agreeing):
    batch = padded_batch(BATCH_LENGTHS, seed=6)
    width = batch["input_ids"].shape[1]
    output = agreeing.generate(
        **batch, max_new_tokens=25, assistant_early_exit=2, num_assistant_tokens=4, return_dict_in_generate=True
    )
    batch_size = len(BATCH_LENGTHS)
    for name in ("rounds", "drafted_tokens", "draft_steps", "accepted_tokens", "acceptance_rate"):
        assert getattr(output, name).shape == (batch_size,), name
    assert output.from_draft.shape == (batch_size, 25)
    # Each round adds a row's accepted drafts plus one token of the full model.
    assert torch.equal(output.accepted_tokens + output.rounds, torch.full((batch_size,), 25))
    assert torch.equal(output.from_draft.sum(dim=-1), output.accepted_tokens)
    assert len(set(output.accepted_tokens.tolist())) > 1, "rows should accept different numbers of drafts"
    torch.testing.assert_close(output.acceptance_rate, output.accepted_tokens / output.drafted_tokens)
    # Every token marked as drafted is what the exit after layer 2 predicts from the row's tokens before it.
    for row in range(batch_size):
        real = slice(width - BATCH_LENGTHS[row], None)
        with torch.no_grad():
            logits = agreeing(output.sequences[row : row + 1, real], exit_layer=2).logits[0, BATCH_LENGTHS[row] - 1 : -1]
        new_tokens, from_draft = output.sequences[row, width:], output.from_draft[row]
        assert torch.equal(new_tokens[from_draft], logits.argmax(-1)[from_draft])
    # The model keeps the call's totals.
    stats = agreeing.speculation_stats
    assert (stats.drafted_tokens, stats.accepted_tokens) == (
        int(output.drafted_tokens.sum()),
        int(output.accepted_tokens.sum()),
    )
    assert stats.rounds == int(output.rounds.max())


def spy_on(monkeypatch, name):
    """Records `(num_active, filled)` of the decoder before and after each call of its method `name`."""
    calls = []
    original = getattr(self_speculative.SelfSpeculativeDecoder, name)

    def spy(decoder, *args):
        before = (decoder.num_active, decoder.filled)
        result = original(decoder, *args)
        calls.append((before, (decoder.num_active, decoder.filled)))
        return result

    monkeypatch.setattr(self_speculative.SelfSpeculativeDecoder, name, spy)
    return calls


def test_finished_rows_leave_the_batch_and_are_padded(agreeing, monkeypatch):
    batch = padded_batch(BATCH_LENGTHS, seed=7)
    width = batch["input_ids"].shape[1]
    drafts = spy_on(monkeypatch, "draft")
    eos = eos_of_first_row(agreeing, batch, new_token=2)
    ours = assert_batch_same_as_plain(agreeing, batch, 2, 4, max_new_tokens=30, eos_token_id=eos)
    active = [before[0] for before, _ in drafts]
    assert active[0] == 4 and active[-1] < 4 and active == sorted(active, reverse=True)
    ends = (ours.sequences[:, width:] == eos).int().argmax(dim=-1)
    assert ends[0] == 2 and torch.all(ours.sequences[0, width + 3 :] == PAD)
    assert ours.rounds[0] < ours.rounds.max(), "a finished row takes part in no more rounds"
    assert not ours.from_draft[0, 3:].any()


@pytest.mark.parametrize("hole_fraction", [0.5, 0.05])
def test_holes_are_compacted_and_the_output_stays_plain(agreeing, monkeypatch, hole_fraction):
    """Rows accept different numbers of drafts per round, so each collects holes; the cache is compacted once they
    are the given fraction of it in every row (0.05: nearly every round, while several rows are active)."""
    monkeypatch.setattr(self_speculative, "_COMPACT_AT_HOLE_FRACTION", hole_fraction)
    monkeypatch.setattr(self_speculative, "_MIN_SLOTS_TO_COMPACT", 1 if hole_fraction < 0.5 else 32)
    compactions = spy_on(monkeypatch, "_compact_if_sparse")
    batch = padded_batch([8, 3, 6, 8], seed=8)
    assert_batch_same_as_plain(agreeing, batch, 2, 6, max_new_tokens=80)
    compacted = [before for before, after in compactions if after[1] < before[1]]
    assert compacted, "the cache should have been compacted"
    if hole_fraction < 0.5:
        assert max(num_active for num_active, _ in compacted) == 4


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 3), (3, 5)])
def test_each_layer_processes_each_position_once_on_a_batch(exit_layer, num_speculations):
    """Layers E..L-1 are identities, so every draft is accepted: each layer processes each (row, position) once,
    as many as in plain batched greedy decoding."""
    model = tiny_model(seed=1)
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    batch = padded_batch(BATCH_LENGTHS, seed=9)
    settings = dict(max_new_tokens=21, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
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
    assert torch.equal(outputs["ours"].acceptance_rate, torch.ones(len(BATCH_LENGTHS)))
    total_length = outputs["plain"].sequences.shape[1]
    assert plain_counts == [len(BATCH_LENGTHS) * (total_length - 1)] * NUM_LAYERS
    assert ours_counts == plain_counts


def test_withheld_drafts_cost_no_layer_pass_on_a_batch(agreeing):
    """With threshold 1.0 no row ever proposes: each round is a plain step, and each layer processes each (row,
    position) once."""
    batch = padded_batch(BATCH_LENGTHS, seed=10)
    settings = dict(max_new_tokens=15, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    outputs = {}
    layers = agreeing.model.layers
    plain_counts = positions_per_layer(
        layers, lambda: outputs.__setitem__("plain", agreeing.generate(**batch, **settings))
    )
    ours_counts = positions_per_layer(
        layers,
        lambda: outputs.__setitem__(
            "ours",
            agreeing.generate(
                **batch, assistant_early_exit=2, num_assistant_tokens=4, assistant_confidence_threshold=1.0, **settings
            ),
        ),
    )
    assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
    assert int(outputs["ours"].drafted_tokens.sum()) == 0
    assert ours_counts == plain_counts


# What a batch does not support raises, naming it.


class SilentStreamer(BaseStreamer):
    """Takes whatever it is given, as a batch-aware streamer would."""

    def put(self, value):
        pass

    def end(self):
        pass


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(streamer=SilentStreamer()), "`streamer`"),
        (dict(return_dict_in_generate=True, output_scores=True), "`output_scores`"),
        (dict(return_dict_in_generate=True, output_logits=True), "`output_logits`"),
        (dict(return_dict_in_generate=True, output_hidden_states=True), "`output_hidden_states`"),
        (dict(prefix_allowed_tokens_fn=lambda batch_id, ids: [1, 2]), "`prefix_allowed_tokens_fn`"),
        (dict(stopping_criteria=StoppingCriteriaList([StopAfterSum()])), r"\['StopAfterSum'\].*eos"),
    ],
)
def test_unsupported_on_a_batch_raises(model, settings, message):
    with pytest.raises(ValueError, match=rf"{message}.*batch|batch.*{message}|{message}"):
        model.generate(**padded_batch([4, 6]), max_new_tokens=3, assistant_early_exit=2, pad_token_id=PAD, **settings)


def test_right_padding_raises(model):
    batch = padded_batch([4, 6])
    batch = {name: tensor.flip(-1) for name, tensor in batch.items()}
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**batch, max_new_tokens=3, assistant_early_exit=2, pad_token_id=PAD)
