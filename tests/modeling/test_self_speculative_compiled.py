"""Compiled self-speculative steps: with a static cache and a `compile_config` that compiles on every device (as
`generate` decides for plain decoding), the draft and verification layer passes run under `torch.compile` on fixed
shapes. Greedy output equals plain greedy's, compiled or not; graphs are counted, so that a shape changing from round
to round (or a row leaving the batch) would fail. Compiling is slow on a CPU: one case uses inductor, the default
backend; the others trace the same graphs with the cheap `aot_eager` backend."""

import pytest
import torch
from conftest import compare_rows_with_plain
from test_self_speculative import agreeing_model, plain_greedy, prompt
from test_self_speculative_batch import PAD, eos_of_first_row, padded_batch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from hf_layerskip.modeling import self_speculative

pytestmark = pytest.mark.usefixtures("one_thread")


def compile_everywhere(backend: str) -> CompileConfig:
    """A `CompileConfig` that `generate` honours on a CPU too; whole graphs, or the test fails."""
    config = CompileConfig(backend=backend, mode="default", fullgraph=True)
    config._compile_all_devices = True
    return config


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Every test counts its own graphs."""
    torch._dynamo.reset()
    self_speculative._compiled_layer_runs.clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    self_speculative._compiled_layer_runs.clear()


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_steps_equal_plain_greedy_with_inductor(agreeing):
    """Two graphs, a draft step and a padded verification; a second call with another prompt reuses them."""
    compiled = dict(cache_implementation="static", compile_config=compile_everywhere("inductor"))
    speculative = dict(assistant_early_exit=2, num_assistant_tokens=4, return_dict_in_generate=True)
    for length, seed in [(9, 41), (6, 42)]:
        input_ids = prompt(length, seed=seed)
        plain = plain_greedy(agreeing, input_ids, max_new_tokens=24)
        ours = agreeing.generate(input_ids, max_new_tokens=24, **speculative, **compiled)
        compare_rows_with_plain(plain, ours.sequences, length)
        assert 0 < ours.accepted_tokens < ours.drafted_tokens  # rounds of several lengths, one verification shape
        assert graphs() == 2


CASES = {
    # A confidence threshold (the exit's median confidence): drafts of 0..d tokens, verification padded to d + 1.
    "threshold": dict(assistant_early_exit=3, num_assistant_tokens=5, assistant_confidence_threshold="median"),
    # Drafts reaching max_length: the last rounds draft fewer tokens.
    "max_length": dict(assistant_early_exit=1, num_assistant_tokens=6),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_steps_equal_plain_greedy(agreeing, name):
    input_ids = prompt(8, seed=43)
    plain = plain_greedy(agreeing, input_ids, max_new_tokens=23)
    case = dict(CASES[name])
    if case.get("assistant_confidence_threshold") == "median":
        with torch.no_grad():
            logits = agreeing(input_ids, exit_layer=case["assistant_early_exit"]).logits[0]
        case["assistant_confidence_threshold"] = float(logits.softmax(dim=-1).max(dim=-1).values.median())
    settings = dict(cache_implementation="static", compile_config=compile_everywhere("aot_eager"), max_new_tokens=23)
    ours = agreeing.generate(input_ids, return_dict_in_generate=True, **case, **settings)
    compare_rows_with_plain(plain, ours.sequences, input_ids.shape[1])
    assert 0 < ours.drafted_tokens < case["num_assistant_tokens"] * ours.rounds  # rounds of several draft lengths
    assert graphs() == 2


def test_compiled_steps_on_a_batch_whose_rows_leave(agreeing):
    """Rows finish at different rounds; the static cache keeps its batch size, so no step is compiled again."""
    batch = padded_batch([10, 4, 12, 7], seed=7)
    eos = eos_of_first_row(agreeing, batch, new_token=2)
    common = dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD)
    plain = plain_greedy(agreeing, **batch, **common)
    # Plain decoding compiled the same way gives the same tokens (its forward is compiled by `generate` itself).
    compiled = dict(cache_implementation="static", compile_config=compile_everywhere("aot_eager"))
    plain_compiled = agreeing.generate(**batch, **common, **compiled)
    compare_rows_with_plain(plain, plain_compiled, batch["input_ids"].shape[1])
    counters.clear()
    ours = agreeing.generate(
        **batch, assistant_early_exit=2, num_assistant_tokens=4, return_dict_in_generate=True, **common, **compiled
    )
    compare_rows_with_plain(plain, ours.sequences, batch["input_ids"].shape[1])
    assert ours.rounds[0] < ours.rounds.max(), "the first row leaves early"
    assert graphs() == 2


def test_a_passed_static_cache_without_room_for_padding(agreeing):
    """A passed cache of exactly `max_length - 1` positions: the last rounds cannot pad verification to d + 1, and
    run those layers uncompiled."""
    from transformers import StaticCache

    input_ids = prompt(8, seed=44)
    plain = plain_greedy(agreeing, input_ids, max_new_tokens=20)
    cache = StaticCache(config=agreeing.config, max_cache_len=8 + 20 - 1)
    ours = agreeing.generate(
        input_ids,
        max_new_tokens=20,
        assistant_early_exit=2,
        num_assistant_tokens=6,
        cache=cache,
        compile_config=compile_everywhere("aot_eager"),
    )
    compare_rows_with_plain(plain, ours, input_ids.shape[1])
    assert graphs() == 2


@pytest.mark.parametrize("lookup_tokens", [2, 6])
def test_lookup_rounds_with_compiled_steps(agreeing, lookup_tokens):
    """Lookup rounds verify with the compiled step (at most d + 1 positions: longer lookups are cut to d) and run
    layers 0..E-1 on their drafts eagerly; greedy output stays plain greedy's."""
    input_ids = prompt(6, seed=3).repeat(1, 3)
    plain = plain_greedy(agreeing, input_ids, max_new_tokens=30)
    ours = agreeing.generate(
        input_ids,
        do_sample=False,
        max_new_tokens=30,
        assistant_early_exit=2,
        num_assistant_tokens=3,
        prompt_lookup_num_tokens=lookup_tokens,
        cache_implementation="static",
        compile_config=compile_everywhere("aot_eager"),
    )
    assert agreeing.speculation_stats.lookup_rounds > 0
    assert not compare_rows_with_plain(plain, ours, input_ids.shape[1])
