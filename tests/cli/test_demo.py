"""`hf-layerskip demo` on a tiny LayerSkip checkpoint and its tiny tokenizer (offline)."""

import io
import json
import re

import pytest
import torch
from test_conversion import save_tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.cli import build_parser, main
from hf_layerskip.cli.demo import (
    DRAFTED_COLOR,
    RESET,
    VERIFIED_COLOR,
    choose_prompts,
    describe_result,
    token_pieces,
    use_color,
)
from hf_layerskip.conversion import convert
from hf_layerskip.generation.demo import DemoResult, run_demo

PROMPTS = ["w3 w9 w27 w81", "w5 w7 w11"]
MAX_NEW_TOKENS = 16
EXIT_LAYER, NUM_SPECULATIONS, NUM_LAYERS = 2, 3, 6
ANSI = re.compile(r"\x1b\[[0-9;]*m")
COUNTS_LINE = re.compile(r"identical: (yes|no) .*\| (\d+) tokens: (\d+) drafted, (\d+) verified$", re.MULTILINE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LayerSkip checkpoint (6 layers, exit layer 2, 3 drafts per round) whose early exit agrees with the
    full model often but not always: layers 3-6 write into the residual stream at 0.3 of their random scale."""
    root = tmp_path_factory.mktemp("demo")
    save_tiny_llama(root / "llama", num_layers=NUM_LAYERS)
    convert(root / "llama", root / "converted", exit_layer=EXIT_LAYER, num_speculations=NUM_SPECULATIONS)
    model = LayerSkipLlamaForCausalLM.from_pretrained(root / "converted")
    with torch.no_grad():
        for layer in model.model.layers[EXIT_LAYER:]:
            layer.self_attn.o_proj.weight.mul_(0.3)
            layer.mlp.down_proj.weight.mul_(0.3)
    model.save_pretrained(root / "layerskip")
    AutoTokenizer.from_pretrained(root / "converted").save_pretrained(root / "layerskip")
    return root / "layerskip"


@pytest.fixture(scope="module")
def references(checkpoint):
    """Per prompt, in-process greedy decoding: plain new tokens and the self-speculative run's `from_draft`."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = LayerSkipLlamaForCausalLM.from_pretrained(checkpoint).eval()
    result = []
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        plain = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)[0, input_ids.shape[1] :]
        speculative = model.generate(
            input_ids,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            assistant_early_exit=EXIT_LAYER,
            num_assistant_tokens=NUM_SPECULATIONS,
            return_dict_in_generate=True,
        )
        result.append((plain, speculative.from_draft[0]))
    return tokenizer, model, result


def run_cli(capsys, checkpoint, *options) -> str:
    argv = ["demo", "--model", str(checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS)]  # float32, the default
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv + list(options)) == 0
    return capsys.readouterr().out


def test_run_demo_matches_plain_greedy(references, one_thread):
    tokenizer, model, expected = references
    prompts = [(f"p{number}", text) for number, text in enumerate(PROMPTS)]
    results = run_demo(model, tokenizer, prompts, EXIT_LAYER, NUM_SPECULATIONS, MAX_NEW_TOKENS)
    assert [r.prompt_id for r in results] == ["p0", "p1"]
    for result, (plain, from_draft) in zip(results, expected):
        torch.testing.assert_close(result.plain_tokens, plain, rtol=0, atol=0)
        torch.testing.assert_close(result.speculative_tokens, plain, rtol=0, atol=0)
        torch.testing.assert_close(result.from_draft, from_draft, rtol=0, atol=0)
        assert result.identical and result.mismatch_position is None
        assert result.num_drafted_kept == result.accepted_tokens  # every accepted draft is kept (no EOS here)
        assert 0 < result.acceptance_rate < 1, "the fixture should accept some drafts and reject others"
        assert result.speedup == pytest.approx(result.plain_seconds / result.speculative_seconds)


def test_cli_prints_completions_and_counts_without_color(checkpoint, references, capsys, one_thread):
    tokenizer, _, expected = references
    out = run_cli(capsys, checkpoint, "--color", "never")
    assert ANSI.search(out) is None and "legend" not in out
    assert "draft with layers 1-2 of 6, up to 3 per round" in out
    for prompt_number, (plain, from_draft) in enumerate(expected, 1):
        assert f"=== prompt {prompt_number} ===\n{tokenizer.decode(plain, skip_special_tokens=True)}\n" in out
    counts = COUNTS_LINE.findall(out)
    assert [(same, int(total), int(drafted), int(verified)) for same, total, drafted, verified in counts] == [
        ("yes", len(plain), int(from_draft.sum()), len(plain) - int(from_draft.sum())) for plain, from_draft in expected
    ]
    assert re.search(r"^all +32 .* median +[\d.]+ +2/2$", out, re.MULTILINE)


def test_color_always_colours_each_token_by_its_source(checkpoint, references, capsys, one_thread):
    tokenizer, _, expected = references
    out = run_cli(capsys, checkpoint, "--color", "always")
    blocks = out.split("=== prompt ")[1:]
    for block, (plain, from_draft) in zip(blocks, expected):
        completion = block.splitlines()[1]
        assert completion.count(DRAFTED_COLOR) == int(from_draft.sum()) > 0
        assert completion.count(VERIFIED_COLOR) == len(plain) - int(from_draft.sum()) > 0
        assert completion.count(RESET) == len(plain)
        assert ANSI.sub("", completion) == tokenizer.decode(plain, skip_special_tokens=True)
    legend = out.splitlines()[-1]
    assert legend.startswith("legend: ") and DRAFTED_COLOR in legend and VERIFIED_COLOR in legend
    assert "layers 1-2" in legend


@pytest.mark.parametrize(
    "choice, is_tty, environ, expected",
    [
        ("auto", True, {}, True),
        ("auto", False, {}, False),
        ("auto", True, {"NO_COLOR": "1"}, False),
        ("auto", True, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
        ("always", False, {"NO_COLOR": "1"}, True),
        ("never", True, {}, False),
    ],
)
def test_use_color(choice, is_tty, environ, expected):
    stream = io.StringIO()
    stream.isatty = lambda: is_tty
    assert use_color(choice, stream, environ) is expected


def test_bfloat16_run_reports_and_exits_zero(checkpoint, capsys, one_thread):
    argv = ["demo", "--model", str(checkpoint), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--color", "never"]
    assert main(argv + ["--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 on cpu" in out and re.search(r"^all +\d+ .* [01]/1$", out, re.MULTILINE)


def test_uses_the_default_checkpoint_without_model(checkpoint, monkeypatch, capsys, one_thread):
    monkeypatch.setattr("hf_layerskip.defaults.default_checkpoint", lambda: checkpoint)
    assert main(["demo", "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--color", "never"]) == 0
    assert "draft with layers 1-2 of 6" in capsys.readouterr().out


@pytest.mark.parametrize("exit_layer", [0, NUM_LAYERS, -1])
def test_bad_exit_layer_names_the_value_and_range(checkpoint, exit_layer):
    pattern = rf"exit layers must be in \[1, {NUM_LAYERS - 1}\] for this model, got \[{exit_layer}\]"
    with pytest.raises(SystemExit, match=pattern):
        main(["demo", "--model", str(checkpoint), "--prompt", PROMPTS[0], "--exit-layer", str(exit_layer)])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--prompts", "0"], r"--prompts must be in \[1, 40\], got 0"),
        (["--prompts", "41"], r"--prompts must be in \[1, 40\], got 41"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--prompt", "w1", "--num-speculations", "0"], "--num-speculations must be at least 1, got 0"),
    ],
)
def test_bad_counts_are_rejected(checkpoint, options, message):
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--model", str(checkpoint), *options])


def test_prompts_and_prompt_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--prompts", "2", "--prompt", "w1"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, expected_ids",
    [
        ([], ["HumanEval/124", "HumanEval/130", "HumanEval/140"]),
        (["--prompts", "2"], ["HumanEval/124", "HumanEval/125"]),
        (["--prompt", "a", "--prompt", "b"], ["prompt 1", "prompt 2"]),
    ],
)
def test_prompt_choice(options, expected_ids):
    from hf_layerskip.generation.data import load_humaneval

    prompts = choose_prompts(build_parser().parse_args(["demo", *options]))
    assert [prompt_id for prompt_id, _ in prompts] == expected_ids
    if not options:
        assert [text for _, text in prompts] == [p.prompt for p in load_humaneval([124, 130, 140])]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with few merges, trained offline, so multi-byte characters span several tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["def add(a, b):\n    return a + b\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def assert_pieces_join(tokenizer, token_ids) -> list[str]:
    pieces = token_pieces(tokenizer, token_ids)
    assert len(pieces) == len(token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any("\ufffd" in piece for piece in pieces)
    return pieces


def test_token_pieces_of_byte_level_tokens_split_inside_characters():
    tokenizer = byte_level_tokenizer()
    text = "def f(x):\n    return 'héllo ✓ 日本'  # ok"
    token_ids = tokenizer(text)["input_ids"]
    pieces = assert_pieces_join(tokenizer, token_ids)
    assert "".join(pieces) == text
    assert "" in pieces, "a token ending inside a multi-byte character should add nothing by itself"
    assert "✓" in pieces and "日" in pieces


def test_token_pieces_of_word_level_tokens_keep_spaces_and_skip_special_tokens(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    pieces = assert_pieces_join(tokenizer, tokenizer("w3 w9 </s> w27")["input_ids"])
    assert pieces == ["w3", " w9", "", " w27"]


def _mismatched_result(logit_gap, is_tie) -> DemoResult:
    return DemoResult(
        prompt_id="p",
        plain_tokens=torch.tensor([5, 6, 7]),
        speculative_tokens=torch.tensor([5, 8, 9]),
        from_draft=torch.tensor([True, False, False]),
        plain_seconds=1.0,
        speculative_seconds=0.5,
        drafted_tokens=2,
        accepted_tokens=1,
        mismatch_position=1,
        logit_gap=logit_gap,
        is_tie=is_tie,
    )


def test_describe_result_explains_a_difference(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # ids 5, 6, 8: w2, w3, w5
    tie = describe_result(tokenizer, _mismatched_result(0.03, True), torch.bfloat16)
    assert tie[0].startswith("identical: no | plain 3.0 tok/s | self-speculative 6.0 tok/s | speedup 2.00x")
    assert tie[0].endswith("acceptance 0.50 (1/2 drafts accepted) | 3 tokens: 1 drafted, 2 verified")
    assert "differ from new token 1 on: plain 'w3' vs self-speculative 'w5', full-model logit gap 0.03" in tie[1]
    assert "a numerical tie in bfloat16" in tie[1]
    assert describe_result(tokenizer, _mismatched_result(2.5, False), torch.float32)[1].endswith(
        "logit gap 2.5: not a numerical tie"
    )
    shorter = _mismatched_result(None, None)
    assert "one run stopped earlier" in describe_result(tokenizer, shorter, torch.float32)[1]


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    (subparsers,) = [action for action in build_parser()._actions if action.dest == "command"]
    for action in subparsers.choices["demo"]._actions:
        assert action.help and action.option_strings[-1] in help_text


def test_output_json_holds_the_printed_figures(checkpoint, references, capsys, tmp_path, one_thread):
    _, _, expected = references
    run_cli(capsys, checkpoint, "--color", "never", "--output", str(tmp_path / "demo.json"))
    written = json.loads((tmp_path / "demo.json").read_text())
    assert written["summary"]["identical"] == written["summary"]["prompts"] == len(expected)
    assert [row["tokens_from_draft"] for row in written["per_prompt"]] == [int(d.sum()) for _, d in expected]
    drafted = sum(row["drafted_tokens"] for row in written["per_prompt"])
    accepted = sum(row["accepted_tokens"] for row in written["per_prompt"])
    assert written["summary"]["acceptance_rate"] == pytest.approx(accepted / drafted)
    assert written["settings"]["exit_layer"] == 2 and written["settings"]["machine"]["cpu_count"] >= 1
