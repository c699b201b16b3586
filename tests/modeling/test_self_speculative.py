"""Self-speculative decoding (`generate(assistant_early_exit=E)`) against plain greedy decoding on tiny random models:
generate features, statistics, the shared cache (counted with hooks), the acceptance rules, and the error cases."""

import copy
import queue
import string

import pytest
import torch
from conftest import compare_rows_with_plain, tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextIteratorStreamer, TextStreamer

from hf_layerskip.generation import plain_llama_view
from hf_layerskip.modeling import self_speculative
from hf_layerskip.modeling.self_speculative import accept_greedy_rows, accept_speculative_sampling

NUM_LAYERS = 6  # of the `model` fixture


pytestmark = pytest.mark.usefixtures("one_thread")


def agreeing_model(seed: int = 0, scale: float = 0.3, **overrides):
    """A tiny model whose layers after the first add `scale` times their usual residual update: early exits agree
    with the full model often, so many drafts are accepted, several per round."""
    model = tiny_model(seed, **overrides)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


@pytest.fixture
def agreeing() -> torch.nn.Module:
    return agreeing_model()


def prompt(length: int, seed: int = 0, vocab_size: int = 128) -> torch.LongTensor:
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def plain_greedy(model, input_ids, **settings):
    """Plain greedy decoding, with the scores needed to tell a numerical tie from a real mismatch."""
    settings = {"return_dict_in_generate": True, "output_scores": True, **settings}
    return model.generate(input_ids, do_sample=False, **settings)


def compare_with_plain(plain, sequences: torch.LongTensor, prompt_length: int) -> dict | None:
    """`None` when `sequences` `(1, length)` equals plain greedy's; a tie record when they first differ at a numerical
    tie (see `compare_rows_with_plain`). Any other difference fails the test."""
    ties = compare_rows_with_plain(plain, sequences, prompt_length)
    return ties[0] if ties else None


def assert_same_as_plain(model, input_ids, exit_layer, num_speculations, **settings):
    """Ours equals plain greedy under the same `settings` (ties excused); returns plain's output."""
    plain = plain_greedy(model, input_ids, **settings)
    ours = model.generate(
        input_ids, do_sample=False, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations, **settings
    )
    compare_with_plain(plain, ours, input_ids.shape[1])
    return plain


def new_tokens(plain, input_ids) -> list[int]:
    return plain.sequences[0, input_ids.shape[1] :].tolist()


def two_letter_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """Offline tokenizer whose ids 0..vocab_size-1 are the two-letter words aa, ab, ...: text splits into letter
    pairs and decoding concatenates them, so text (and stop strings) can span tokens."""
    words = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase][:vocab_size]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="aa"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(".."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="aa")


# Plain generate features, each also run by plain greedy decoding, must give the same tokens.


@pytest.mark.parametrize("exit_layer", range(1, NUM_LAYERS))
@pytest.mark.parametrize("num_speculations", [1, 3, 6])
def test_greedy_equals_plain_for_every_exit(model, exit_layer, num_speculations):
    input_ids = prompt(12, seed=exit_layer)
    assert_same_as_plain(model, input_ids, exit_layer, num_speculations, max_new_tokens=24)


def test_one_token_prompt(model):
    assert_same_as_plain(model, prompt(1), 2, 3, max_new_tokens=16)


def test_single_eos_stops_where_plain_greedy_stops(agreeing):
    input_ids = prompt(10, seed=1)
    emitted = new_tokens(plain_greedy(agreeing, input_ids, max_new_tokens=20), input_ids)
    eos = emitted[8]  # a token plain greedy emits mid-way
    plain = assert_same_as_plain(agreeing, input_ids, 3, 4, max_new_tokens=20, eos_token_id=eos)
    generated = new_tokens(plain, input_ids)
    assert generated[-1] == eos and len(generated) == emitted.index(eos) + 1 < 20


def test_several_eos_tokens(agreeing):
    input_ids = prompt(10, seed=2)
    emitted = new_tokens(plain_greedy(agreeing, input_ids, max_new_tokens=20), input_ids)
    eos = [emitted[12], emitted[6]]  # the later one listed first
    plain = assert_same_as_plain(agreeing, input_ids, 2, 5, max_new_tokens=20, eos_token_id=eos)
    generated = new_tokens(plain, input_ids)
    assert generated[-1] in eos and len(generated) == min(emitted.index(t) for t in eos) + 1


def test_min_new_tokens_holds_back_eos(agreeing):
    input_ids = prompt(10, seed=3)
    emitted = new_tokens(plain_greedy(agreeing, input_ids, max_new_tokens=20), input_ids)
    eos = emitted[1]
    plain = assert_same_as_plain(agreeing, input_ids, 3, 4, max_new_tokens=20, eos_token_id=eos, min_new_tokens=8)
    assert len(new_tokens(plain, input_ids)) >= 8 > emitted.index(eos) + 1


def test_max_length(agreeing):
    input_ids = prompt(9, seed=4)
    plain = assert_same_as_plain(agreeing, input_ids, 2, 4, max_length=22)
    assert plain.sequences.shape[1] == 22


def test_repetition_penalty(agreeing):
    input_ids = prompt(10, seed=5)
    plain = assert_same_as_plain(agreeing, input_ids, 3, 4, max_new_tokens=24, repetition_penalty=1.5)
    unpenalised = plain_greedy(agreeing, input_ids, max_new_tokens=24)
    assert not torch.equal(plain.sequences, unpenalised.sequences), "the penalty should change this output"


def test_no_repeat_ngram_size(agreeing):
    input_ids = prompt(10, seed=6)
    plain = assert_same_as_plain(agreeing, input_ids, 2, 4, max_new_tokens=30, no_repeat_ngram_size=2)
    sequence = plain.sequences[0].tolist()
    bigrams = list(zip(sequence, sequence[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_explicit_all_ones_attention_mask(agreeing):
    input_ids = prompt(10, seed=7)
    assert_same_as_plain(agreeing, input_ids, 3, 3, max_new_tokens=16, attention_mask=torch.ones_like(input_ids))


@pytest.mark.parametrize("num_padding", [1, 5])
def test_left_padded_attention_mask(agreeing, num_padding):
    input_ids = prompt(12, seed=8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, :num_padding] = 0
    assert_same_as_plain(agreeing, input_ids, 2, 4, max_new_tokens=16, attention_mask=attention_mask, pad_token_id=0)


def test_stop_strings_span_tokens(agreeing):
    tokenizer = two_letter_tokenizer()
    input_ids = prompt(10, seed=9)
    emitted = new_tokens(plain_greedy(agreeing, input_ids, max_new_tokens=24), input_ids)
    # The last letter of new token 9 and the first of new token 10.
    stop = tokenizer.decode(emitted[9:11])[1:3]
    plain = assert_same_as_plain(agreeing, input_ids, 2, 5, max_new_tokens=24, stop_strings=stop, tokenizer=tokenizer)
    generated = new_tokens(plain, input_ids)
    # Plain decoding stops at the first token that completes the stop string.
    assert stop in tokenizer.decode(generated) and stop not in tokenizer.decode(generated[:-1])
    assert len(generated) <= 11


def test_custom_stopping_criteria(agreeing):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterSum(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, -3:].sum(dim=-1) > 250).to(torch.bool)

    input_ids = prompt(6, seed=10)
    settings = dict(max_new_tokens=40, stopping_criteria=StoppingCriteriaList([StopAfterSum()]))
    plain = assert_same_as_plain(agreeing, input_ids, 2, 6, **settings)
    assert len(new_tokens(plain, input_ids)) < 40


def test_stopping_criteria_see_the_scores_plain_decoding_gives_them(agreeing):
    from transformers import StoppingCriteria, StoppingCriteriaList

    input_ids = prompt(10, seed=22)
    settings = dict(max_new_tokens=40, repetition_penalty=1.3, return_dict_in_generate=True, output_scores=True)
    confidence = torch.cat(plain_greedy(agreeing, input_ids, **settings).scores).softmax(dim=-1).max(dim=-1).values
    bar = float(confidence[:12].max()) - 1e-6  # first passed within 12 tokens

    class StopOnConfidence(StoppingCriteria):
        """Stops once the chosen token's probability passes the bar: reads the scores, as a user's criterion may."""

        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores, **kwargs):
            # transformers passes every new token's processed scores so far (with `output_scores`).
            self.seen.append(scores)
            return scores[-1].softmax(dim=-1).max(dim=-1).values > bar

    runs = {}
    for name, extra in (("plain", {}), ("ours", dict(assistant_early_exit=2, num_assistant_tokens=4))):
        criterion = StopOnConfidence()
        sequences = agreeing.generate(
            input_ids, do_sample=False, stopping_criteria=StoppingCriteriaList([criterion]), **settings, **extra
        )
        runs[name] = (sequences.sequences, criterion.seen)
    (plain, plain_seen), (ours, ours_seen) = runs["plain"], runs["ours"]
    assert torch.equal(ours, plain) and 1 < plain.shape[1] - input_ids.shape[1] < 40, "the bar should stop mid-way"
    assert len(ours_seen) == len(plain_seen) == plain.shape[1] - input_ids.shape[1]
    for step, (ours_scores, plain_scores) in enumerate(zip(ours_seen, plain_seen), 1):
        assert len(ours_scores) == len(plain_scores) == step
        torch.testing.assert_close(torch.cat(ours_scores), torch.cat(plain_scores), atol=1e-4, rtol=1e-4)


def test_text_streamer_prints_what_plain_decoding_prints(agreeing, capsys):
    tokenizer = two_letter_tokenizer()
    input_ids = prompt(10, seed=11)
    agreeing.generate(input_ids, max_new_tokens=20, streamer=TextStreamer(tokenizer, skip_prompt=True))
    plain_text = capsys.readouterr().out
    agreeing.generate(
        input_ids,
        max_new_tokens=20,
        assistant_early_exit=2,
        num_assistant_tokens=5,
        streamer=TextStreamer(tokenizer, skip_prompt=True),
    )
    assert capsys.readouterr().out == plain_text
    assert plain_text.strip() == tokenizer.decode(
        new_tokens(plain_greedy(agreeing, input_ids, max_new_tokens=20), input_ids)
    )


def test_iterator_streamer_sees_the_same_text(agreeing):
    tokenizer = two_letter_tokenizer()
    input_ids = prompt(10, seed=12)

    def streamed(**settings) -> str:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=0)
        agreeing.generate(input_ids, max_new_tokens=20, streamer=streamer, **settings)
        pieces = []
        try:
            pieces.extend(streamer)
        except queue.Empty:
            pass
        return "".join(pieces)

    assert streamed(assistant_early_exit=3, num_assistant_tokens=4) == streamed()


def test_scores_and_logits_match_plain(agreeing):
    input_ids = prompt(10, seed=13)
    settings = dict(max_new_tokens=16, repetition_penalty=1.3, output_logits=True)
    plain = assert_same_as_plain(agreeing, input_ids, 2, 4, **settings)
    plain = plain_greedy(agreeing, input_ids, **settings)
    ours = agreeing.generate(
        input_ids,
        do_sample=False,
        assistant_early_exit=2,
        num_assistant_tokens=4,
        return_dict_in_generate=True,
        output_scores=True,
        **settings,
    )
    assert torch.equal(ours.sequences, plain.sequences)
    assert len(ours.scores) == len(ours.logits) == len(plain.scores) == 16
    for name in ("scores", "logits"):
        for ours_step, plain_step in zip(getattr(ours, name), getattr(plain, name)):
            assert ours_step.shape == plain_step.shape == (1, 128)
            torch.testing.assert_close(ours_step, plain_step, atol=1e-4, rtol=1e-4)
    # The penalty makes them differ: scores are processed, logits raw.
    assert any(not torch.equal(score, logit) for score, logit in zip(ours.scores, ours.logits))


def assert_hidden_states_match(ours, plain, num_new_tokens: int):
    """Plain greedy's structure (a tuple per new token, each of num_layers + 1 tensors, the first token's covering
    the prompt) and values within 1e-4."""
    assert torch.equal(ours.sequences, plain.sequences)
    assert len(ours.hidden_states) == len(plain.hidden_states) == num_new_tokens
    for step, (ours_step, plain_step) in enumerate(zip(ours.hidden_states, plain.hidden_states)):
        assert len(ours_step) == len(plain_step) == NUM_LAYERS + 1
        for layer, (ours_state, plain_state) in enumerate(zip(ours_step, plain_step)):
            assert ours_state.shape == plain_state.shape, (step, layer)
            torch.testing.assert_close(ours_state, plain_state, atol=1e-4, rtol=1e-4, msg=f"step {step}, layer {layer}")


@pytest.mark.parametrize("prompt_length", [1, 10])
@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 1), (2, 4), (4, 3), (5, 6)])
@pytest.mark.parametrize("confident_only", [False, True])
def test_hidden_states_match_plain(agreeing, monkeypatch, prompt_length, exit_layer, num_speculations, confident_only):
    """Layers 0..E-1 come from the draft steps, E..L-1 from verification; with a confidence threshold, from withheld
    draft steps too."""
    input_ids = prompt(prompt_length, seed=exit_layer)
    settings = dict(max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    threshold = 0.0
    if confident_only:
        # The exit's median confidence over the output: about half the draft steps are withheld.
        sequences = plain_greedy(agreeing, input_ids, max_new_tokens=14).sequences
        with torch.no_grad():
            logits = agreeing(sequences, exit_layer=exit_layer).logits[0, prompt_length - 1 :]
        threshold = float(logits.softmax(dim=-1).max(dim=-1).values.median())
    # Per round: whether a withheld draft step had already run layers 0..E-1 on the last candidate token.
    withheld = []
    verify = self_speculative.SelfSpeculativeDecoder.verify

    def spy(decoder, num_drafted):
        withheld.append(decoder.cache.get_seq_length(0) == decoder.filled + num_drafted + 1)
        return verify(decoder, num_drafted)

    monkeypatch.setattr(self_speculative.SelfSpeculativeDecoder, "verify", spy)
    plain = agreeing.generate(input_ids, **settings)
    ours = agreeing.generate(
        input_ids,
        assistant_early_exit=exit_layer,
        num_assistant_tokens=num_speculations,
        assistant_confidence_threshold=threshold,
        **settings,
    )
    assert ours.drafted_tokens > 0
    assert any(withheld) == confident_only and not all(withheld)
    assert_hidden_states_match(ours, plain, 14)
    assert ours.hidden_states[0][0].shape == (1, prompt_length, agreeing.config.hidden_size)


def test_hidden_states_continuing_from_a_cache(agreeing):
    """The first new token's hidden states cover only the prompt positions the cache did not hold, as plain's."""
    first = agreeing.generate(prompt(8, seed=23), max_new_tokens=6, return_dict_in_generate=True)
    conversation = torch.cat([first.sequences, prompt(5, seed=24)], dim=1)
    uncached = conversation.shape[1] - first.cache.get_seq_length()  # the user turn and the last reply token
    settings = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    plain = agreeing.generate(conversation, cache=copy.deepcopy(first.cache), **settings)
    ours = agreeing.generate(conversation, cache=first.cache, assistant_early_exit=2, num_assistant_tokens=4, **settings)
    assert_hidden_states_match(ours, plain, 10)
    assert ours.hidden_states[0][0].shape[1] == uncached == 6


def test_hidden_states_are_not_kept_without_the_flag(agreeing):
    ours = agreeing.generate(
        prompt(6), max_new_tokens=5, assistant_early_exit=2, return_dict_in_generate=True, output_scores=True
    )
    assert ours.hidden_states is None


def test_generation_config_object_equals_kwargs(agreeing):
    input_ids = prompt(10, seed=14)
    config = GenerationConfig(max_new_tokens=20, do_sample=False, assistant_early_exit=3, num_assistant_tokens=2)
    from_config = agreeing.generate(input_ids, generation_config=config)
    stats_from_config = copy.copy(agreeing.speculation_stats)
    from_kwargs = agreeing.generate(
        input_ids, max_new_tokens=20, do_sample=False, assistant_early_exit=3, num_assistant_tokens=2
    )
    assert torch.equal(from_config, from_kwargs)
    assert stats_from_config == agreeing.speculation_stats
    assert agreeing.speculation_stats.drafted_tokens <= 2 * agreeing.speculation_stats.rounds
    assert_same_as_plain(agreeing, input_ids, 3, 2, max_new_tokens=20)


def test_draft_length_is_read_from_the_call(agreeing):
    input_ids = prompt(10, seed=15)
    drafted_per_round = {}
    for num_speculations in (1, 5):
        agreeing.generate(input_ids, max_new_tokens=30, assistant_early_exit=2, num_assistant_tokens=num_speculations)
        stats = agreeing.speculation_stats
        drafted_per_round[num_speculations] = stats.drafted_tokens / stats.rounds
    assert drafted_per_round[1] <= 1 < drafted_per_round[5] <= 5


def test_confidence_threshold_stops_drafting_and_stays_lossless(agreeing):
    input_ids = prompt(10, seed=16)
    # The median confidence of the exit over the prompt: drafting stops about half the time.
    with torch.no_grad():
        confidence = agreeing(input_ids, exit_layer=2).logits[0].softmax(dim=-1).max(dim=-1).values
    drafted = {}
    for threshold in (0.0, float(confidence.median()), 1.0):
        assert_same_as_plain(agreeing, input_ids, 2, 6, max_new_tokens=30, assistant_confidence_threshold=threshold)
        agreeing.generate(
            input_ids,
            max_new_tokens=30,
            assistant_early_exit=2,
            num_assistant_tokens=6,
            assistant_confidence_threshold=threshold,
        )
        stats = agreeing.speculation_stats
        drafted[threshold] = stats.drafted_tokens / stats.rounds
    # No probability reaches 1: with threshold 1.0 no token is ever proposed, and each round is a plain step.
    assert drafted[1.0] == 0
    assert drafted[1.0] < drafted[float(confidence.median())] < drafted[0.0]


def test_a_withheld_draft_costs_no_layer_pass(agreeing):
    """An unconfident draft step is not wasted: verification goes on from its exit state. With threshold 1.0 no
    draft is ever proposed, and each layer processes each position exactly once, as in plain greedy decoding."""
    input_ids = prompt(9, seed=21)
    settings = dict(max_new_tokens=15, do_sample=False, return_dict_in_generate=True)
    outputs = {}
    layers = agreeing.model.layers
    plain_counts = positions_per_layer(layers, lambda: outputs.__setitem__("plain", agreeing.generate(input_ids, **settings)))
    ours_counts = positions_per_layer(
        layers,
        lambda: outputs.__setitem__(
            "ours",
            agreeing.generate(
                input_ids, assistant_early_exit=2, num_assistant_tokens=4, assistant_confidence_threshold=1.0, **settings
            ),
        ),
    )
    assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
    assert outputs["ours"].drafted_tokens == 0
    # One withheld step per round, but in the last, which has room for the full model's token only.
    assert outputs["ours"].draft_steps == outputs["ours"].rounds - 1
    assert ours_counts == plain_counts


def test_statistics(agreeing):
    input_ids = prompt(10, seed=17)
    output = agreeing.generate(
        input_ids, max_new_tokens=25, assistant_early_exit=3, num_assistant_tokens=4, return_dict_in_generate=True
    )
    stats = agreeing.speculation_stats
    assert (output.rounds, output.drafted_tokens, output.accepted_tokens) == (
        stats.rounds,
        stats.drafted_tokens,
        stats.accepted_tokens,
    )
    assert output.acceptance_rate == stats.acceptance_rate == stats.accepted_tokens / stats.drafted_tokens
    assert 0 < stats.accepted_tokens < stats.drafted_tokens <= 4 * stats.rounds
    # Each round adds its accepted draft tokens plus one token of the full agreeing.
    assert output.sequences.shape[1] - input_ids.shape[1] == 25 == stats.accepted_tokens + stats.rounds


# One shared cache: every layer processes every position once, as in plain greedy decoding.


def positions_per_layer(layers, generate) -> list[int]:
    """How many positions each decoder layer processes during `generate()`, summed over the rows of the batch."""
    counts = [0] * len(layers)

    def counter(index):
        def hook(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            counts[index] += hidden_states.shape[0] * hidden_states.shape[1]

        return hook

    handles = [layer.register_forward_pre_hook(counter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        generate()
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 3), (2, 4), (4, 2), (3, 7)])
def test_each_layer_processes_each_position_once(exit_layer, num_speculations):
    model = tiny_model(seed=1)
    # Layers E..L-1 become exact identities (their residual branches output zeros): every draft is accepted.
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    layers = model.model.layers
    input_ids = prompt(11, seed=18)
    settings = dict(max_new_tokens=23, do_sample=False, return_dict_in_generate=True)
    outputs = {}

    def run(name, generate_fn, **extra):
        return lambda: outputs.__setitem__(name, generate_fn(input_ids, **settings, **extra))

    plain_counts = positions_per_layer(layers, run("plain", model.generate))
    ours_counts = positions_per_layer(
        layers, run("ours", model.generate, assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations)
    )
    builtin = plain_llama_view(model)
    builtin.generation_config.num_assistant_tokens = num_speculations  # the built-in path reads it from here
    builtin_counts = positions_per_layer(
        builtin.model.layers,
        run(
            "builtin",
            builtin.generate,
            assistant_early_exit=exit_layer,
            num_assistant_tokens=num_speculations,
        ),
    )

    total_length = outputs["plain"].sequences.shape[1]
    assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
    assert torch.equal(outputs["builtin"].sequences, outputs["plain"].sequences)
    assert outputs["ours"].acceptance_rate == 1.0
    assert plain_counts == [total_length - 1] * NUM_LAYERS
    assert ours_counts == plain_counts
    # The built-in path drafts with a second cache and verifies with all layers: the first E layers work more.
    assert all(builtin_counts[i] > plain_counts[i] for i in range(exit_layer))
    # One cache, one entry per layer, as long as plain greedy's.
    ours_cache, plain_cache = outputs["ours"].cache, outputs["plain"].cache
    assert len(ours_cache.layers) == len(plain_cache.layers) == NUM_LAYERS
    assert [ours_cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [
        plain_cache.get_seq_length(i) for i in range(NUM_LAYERS)
    ]
    assert ours_cache.get_seq_length(0) == total_length - 1


@pytest.mark.parametrize("exit_layer, lookup_tokens", [(1, 2), (3, 4), (5, 6)])
def test_lookup_drafts_are_processed_once_by_every_layer(agreeing, exit_layer, lookup_tokens):
    """Lookup rounds run every layer on their drafts in verification, early-exit rounds run layers 0..E-1 in draft
    steps and the rest in verification: every layer processes each kept position once and each rejected draft once."""
    input_ids = prompt(6, seed=31).repeat(1, 3)  # lookup finds the chunk again
    plain_output = {}
    plain_counts = positions_per_layer(
        agreeing.model.layers,
        lambda: plain_output.setdefault("out", agreeing.generate(input_ids, max_new_tokens=30, do_sample=False)),
    )
    output = {}
    counts = positions_per_layer(
        agreeing.model.layers,
        lambda: output.setdefault(
            "out",
            agreeing.generate(
                input_ids,
                max_new_tokens=30,
                assistant_early_exit=exit_layer,
                num_assistant_tokens=3,
                prompt_lookup_num_tokens=lookup_tokens,
                return_dict_in_generate=True,
            ),
        ),
    )
    stats = agreeing.speculation_stats
    assert 0 < stats.lookup_rounds < stats.rounds  # both kinds of round
    assert torch.equal(output["out"].sequences, plain_output["out"])
    rejected = stats.drafted_tokens - stats.accepted_tokens
    assert counts == [plain_counts[0] + rejected] * NUM_LAYERS


def test_lookup_continuation_is_the_latest_longest_match():
    """Against a direct search: for n from the largest down, the last earlier start of the final n tokens."""
    generator = torch.Generator().manual_seed(5)
    for _ in range(300):
        sequence = torch.randint(0, 4, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
        max_ngram_size, num_tokens = int(torch.randint(1, 4, (1,))), int(torch.randint(1, 5, (1,)))
        tokens, expected = sequence.tolist(), (0, [])
        for n in range(min(max_ngram_size, len(tokens) - 1), 0, -1):
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
            if starts:
                expected = (n, tokens[starts[-1] + n : starts[-1] + n + num_tokens])
                break
        match_length, continuation = self_speculative.lookup_continuation(sequence, max_ngram_size, num_tokens)
        assert (match_length, continuation.tolist()) == expected


def test_lookup_length_defaults_to_the_config_and_the_call_overrides_it(agreeing):
    input_ids = prompt(6, seed=31).repeat(1, 3)
    agreeing.generate(input_ids, max_new_tokens=12, assistant_early_exit=2)
    assert agreeing.speculation_stats.lookup_rounds == 0  # the config's default: off
    agreeing.config.num_lookup_speculations = 3
    agreeing.generate(input_ids, max_new_tokens=12, assistant_early_exit=2)
    assert agreeing.speculation_stats.lookup_rounds > 0
    agreeing.generate(input_ids, max_new_tokens=12, assistant_early_exit=2, prompt_lookup_num_tokens=0)
    assert agreeing.speculation_stats.lookup_rounds == 0


@pytest.mark.parametrize(
    "settings, message",
    [(dict(prompt_lookup_num_tokens=-1), "prompt_lookup_num_tokens"), (dict(max_matching_ngram_size=0), "max_matching")],
)
def test_bad_lookup_settings(model, settings, message):
    with pytest.raises(ValueError, match=message):
        model.generate(prompt(4), max_new_tokens=4, assistant_early_exit=2, **settings)


def test_rejected_drafts_are_cropped_from_every_layer(model):
    input_ids = prompt(10, seed=19)
    plain = plain_greedy(model, input_ids, max_new_tokens=20)
    ours = model.generate(
        input_ids, max_new_tokens=20, assistant_early_exit=1, num_assistant_tokens=6, return_dict_in_generate=True
    )
    assert ours.drafted_tokens > ours.accepted_tokens  # some drafts were rejected
    for i in range(NUM_LAYERS):
        assert ours.cache.get_seq_length(i) == plain.cache.get_seq_length(i) == ours.sequences.shape[1] - 1
        keys, plain_keys = ours.cache.layers[i].keys, plain.cache.layers[i].keys
        torch.testing.assert_close(keys, plain_keys, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("first_turn", ["plain", "self_speculative"])
def test_multi_turn_continues_from_the_returned_cache(agreeing, first_turn):
    speculative = dict(assistant_early_exit=2, num_assistant_tokens=4)
    turn_one = prompt(8, seed=23)
    first = agreeing.generate(
        turn_one,
        do_sample=False,
        max_new_tokens=12,
        return_dict_in_generate=True,
        **(speculative if first_turn == "self_speculative" else {}),
    )
    user_turn = prompt(5, seed=24)
    conversation = torch.cat([first.sequences, user_turn], dim=1)
    held = first.cache.get_seq_length()
    assert held == first.sequences.shape[1] - 1
    ours = agreeing.generate(
        conversation, do_sample=False, max_new_tokens=16, cache=first.cache, return_dict_in_generate=True, **speculative
    )
    # Plain greedy over the whole conversation, from no cache at all.
    plain = plain_greedy(agreeing, conversation, max_new_tokens=16)
    compare_with_plain(plain, ours.sequences, conversation.shape[1])
    assert ours.drafted_tokens > 0
    # Only the tokens the cache did not hold were prefilled: each layer processed each position once.
    assert ours.cache.get_seq_length() == ours.sequences.shape[1] - 1
    # The first turn's output equals plain greedy's too.
    compare_with_plain(plain_greedy(agreeing, turn_one, max_new_tokens=12), first.sequences, turn_one.shape[1])


def test_a_cache_with_uneven_layers_is_rejected(model):
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    input_ids = prompt(6)
    model(input_ids, cache=cache, use_cache=True)
    cache.layers[-1].crop(-2)
    with pytest.raises(ValueError, match=r"same number of tokens.*\[4, 6\]"):
        model.generate(input_ids, max_new_tokens=3, cache=cache, assistant_early_exit=2)


# The acceptance rules on their own.


def test_accept_greedy_counts_the_agreeing_prefix():
    scores = torch.full((4, 10), -1.0)
    scores[torch.arange(4), torch.tensor([3, 5, 7, 2])] = 1.0  # the full model's tokens: 3 5 7 2
    # Three rows judged at once: all drafts agree, the second disagrees, the first disagrees.
    drafts = torch.tensor([[3, 5, 7], [3, 6, 7], [4, 5, 7]])
    num_accepted, tokens = accept_greedy_rows(drafts, scores.expand(3, -1, -1))
    assert num_accepted.tolist() == [3, 1, 0]
    assert tokens.tolist() == [[3, 5, 7, 2]] * 3
    num_accepted, tokens = accept_greedy_rows(torch.zeros((1, 0), dtype=torch.long), scores[None, :1])
    assert (num_accepted.tolist(), tokens.tolist()) == ([0], [[3]])


def test_speculative_sampling_rule_reproduces_target_distribution():
    """Many draws of the rule alone: the first new token follows p, whatever q drafted it."""
    generator = torch.Generator().manual_seed(0)
    vocab_size, num_drafted, draws = 6, 2, 20000
    p = torch.softmax(torch.randn(num_drafted + 1, vocab_size, generator=generator) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(num_drafted, vocab_size, generator=generator) * 1.5, dim=-1)
    torch.manual_seed(0)
    counts = torch.zeros(vocab_size)
    for _ in range(draws):
        draft = torch.stack([torch.multinomial(q[i], 1)[0] for i in range(num_drafted)])
        _, tokens = accept_speculative_sampling(draft, q, p)
        counts[tokens[0]] += 1
    total_variation = float((counts / draws - p[0]).abs().sum() / 2)
    assert total_variation < 0.015, total_variation


# Errors name the value and what is allowed; nothing silently falls back.


@pytest.mark.parametrize("exit_layer", [0, -1, NUM_LAYERS, NUM_LAYERS + 3, 2.5, True])
def test_bad_exit_layer(model, exit_layer):
    with pytest.raises(ValueError, match=rf"assistant_early_exit.*\[1, {NUM_LAYERS - 1}\].*{exit_layer!r}"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=exit_layer)


@pytest.mark.parametrize("num_speculations", [0, -2, 1.5])
def test_bad_num_assistant_tokens(model, num_speculations):
    with pytest.raises(ValueError, match=rf"num_assistant_tokens.*>= 1.*{num_speculations!r}"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, num_assistant_tokens=num_speculations)


def test_bad_confidence_threshold(model):
    with pytest.raises(ValueError, match=r"assistant_confidence_threshold.*\[0, 1\].*1.5"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, assistant_confidence_threshold=1.5)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_beams=2), "num_beams=2"),
        (dict(num_beams=2, do_sample=True), "num_beams=2"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(num_assistant_tokens_schedule="heuristic"), "num_assistant_tokens_schedule='heuristic'"),
        (dict(cache_implementation="offloaded"), r"cache_implementation='offloaded'.*None, 'dynamic', 'static'"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
        (dict(exit_layer=3), "exit_layer"),
        (dict(early_exit=3), "early_exit"),
        (dict(guidance_scale=1.5), "guidance_scale"),
        (dict(assistant_ensemble_weight=0.5), "assistant_ensemble_weight"),
    ],
)
def test_unsupported_settings_raise(model, settings, message):
    with pytest.raises(ValueError, match=message):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, **settings)


def test_another_cache_object_raises(model):
    from transformers import DynamicCache

    class OtherCache(DynamicCache):
        pass

    with pytest.raises(ValueError, match="DynamicCache.*StaticCache.*OtherCache"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, cache=OtherCache(config=model.config))


def test_a_static_cache_too_short_raises(model):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=6)
    with pytest.raises(ValueError, match="static cache holds 6 positions.*max_length=8.*7"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, cache=cache)


def test_inputs_embeds_raise(model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=torch.randn(1, 5, 64), max_new_tokens=3, assistant_early_exit=2)


def test_assistant_model_raises(model):
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(prompt(5), max_new_tokens=3, assistant_early_exit=2, assistant_model=tiny_model(seed=1))


def test_speculative_module_imports_only_torch_and_transformers():
    """It travels with checkpoints as remote code."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(self_speculative))
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
        for alias in node.names
    }
    assert roots <= {"torch", "transformers", "copy", "dataclasses", "time"}, roots


@pytest.mark.parametrize("max_new_tokens", [7, 40])
def test_from_draft_marks_exactly_the_accepted_drafts(agreeing, max_new_tokens):
    input_ids = prompt(10, seed=21)
    output = agreeing.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        assistant_early_exit=2,
        num_assistant_tokens=4,
        return_dict_in_generate=True,
    )
    new_tokens, from_draft = output.sequences[0, input_ids.shape[1] :], output.from_draft[0]
    assert output.from_draft.shape == (1, len(new_tokens))
    assert 0 < int(from_draft.sum()) <= output.accepted_tokens
    # Every token marked as drafted is what the exit after layer 2 predicts from the tokens before it.
    with torch.no_grad():
        exit_tokens = agreeing(output.sequences, exit_layer=2).logits[0, input_ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(new_tokens[from_draft], exit_tokens[from_draft])
    assert not torch.equal(new_tokens, exit_tokens)  # so the check above tells drafts from verified tokens
