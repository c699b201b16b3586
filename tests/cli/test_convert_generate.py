"""`hf-layerskip convert` and `hf-layerskip generate` on a tiny Llama directory and its tiny tokenizer (offline)."""

import dataclasses
import io
import re

import pytest
import torch
from test_conversion import save_tiny_llama, save_tiny_stock
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.cli import build_parser, main
from hf_layerskip.arguments import LayerSkipConfigArguments
from hf_layerskip.cli.convert import ARGUMENT_TYPES as CONVERT_ARGUMENTS
from hf_layerskip.cli.parsing import dataclasses_from
from hf_layerskip.defaults import BASE_CHECKPOINT_NAME
from hf_layerskip.modeling.configuration_layerskip_llama import LayerSkipLlamaConfig

PROMPT = "w3 w9 w27 w81"
MAX_NEW_TOKENS = 12
SPEED_LINE = re.compile(r"^(\d+) new tokens in [\d.]+ s: [\d.]+ tokens/s$", re.MULTILINE)
STATS_LINE = re.compile(r"^drafted (\d+), accepted (\d+), rounds (\d+), acceptance rate ([\d.]+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LayerSkip checkpoint converted through the CLI (6 layers, chat template, exit layer 2)."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "llama", num_layers=6)
    assert main(["convert", str(root / "llama"), str(root / "layerskip"), "--exit-layer", "2"]) == 0
    return root / "layerskip"


def reference_completion(checkpoint, use_chat_template=True, **generate_kwargs) -> tuple[str, int, object]:
    """`(text, new_tokens, model)` of in-process greedy decoding, for comparison with the CLI's output."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if use_chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        inputs = tokenizer(PROMPT, return_tensors="pt")
    sequences = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **generate_kwargs)
    new_tokens = sequences[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens), model


def run_generate(capsys, checkpoint, *options):
    assert main(["generate", PROMPT, "--model", str(checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS), *options]) == 0
    return capsys.readouterr()


# convert


def test_convert_sets_every_layerskip_field(tmp_path, capsys):
    save_tiny_llama(tmp_path / "llama", num_layers=6)
    options = {
        "--layer-dropout-max": ["0.3"],
        "--layer-dropout-scale": ["linear"],
        "--layer-dropout-layers": ["1", "4"],
        "--early-exit-loss-scale": ["0.2"],
        "--early-exit-layer-weighting": ["sqrt"],
        "--early-exit-curriculum": ["gradual"],
        "--early-exit-curriculum-period": ["3"],
        "--early-exit-gradual-fraction": ["0.25"],
        "--early-exit-layers": ["2", "3"],
        "--exit-layer": ["4"],
        "--num-speculations": ["5"],
        "--num-lookup-speculations": ["4"],
        "--lookup-ngram-size": ["3"],
        "--dynamic-exit": ["true"],
    }
    expected = dict(
        layer_dropout_max=0.3, layer_dropout_scale="linear", layer_dropout_layers=[1, 4], early_exit_loss_scale=0.2,
        early_exit_layer_weighting="sqrt", early_exit_curriculum="gradual", early_exit_curriculum_period=3,
        early_exit_gradual_fraction=0.25, early_exit_layers=[2, 3], exit_layer=4, num_speculations=5,
        num_lookup_speculations=4, lookup_ngram_size=3, dynamic_exit=True,
    )
    assert set(expected) == {field.name for field in dataclasses.fields(LayerSkipConfigArguments)}
    argv = ["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--dtype", "bfloat16"]
    for option, values in options.items():
        argv += [option, *values]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    model = LayerSkipLlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert {field: getattr(model.config, field) for field in expected} == expected
    assert model.dtype == torch.bfloat16
    assert model.generation_config.num_assistant_tokens == 5
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()


def test_layerskip_options_are_config_fields_unset_by_default(tmp_path):
    """Each option is a config field; unset, it parses to None and the conversion keeps the config's default."""
    config_defaults = {field.name: field.default for field in dataclasses.fields(LayerSkipLlamaConfig)}
    _, settings = dataclasses_from(build_parser().parse_args(["convert", "src", "out"]), CONVERT_ARGUMENTS)
    for field in dataclasses.fields(settings):
        assert field.name in config_defaults and getattr(settings, field.name) is None
        if config_defaults[field.name] is not None:
            assert f"({config_defaults[field.name]})" in field.metadata["help"], field.name
    assert settings.given() == {}


def test_convert_rejects_a_bad_setting(tmp_path):
    save_tiny_llama(tmp_path / "llama", num_layers=6)
    with pytest.raises(ValueError, match="`exit_layer` must be in \\[1, 5\\], got 9"):
        main(["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--exit-layer", "9"])


def test_convert_needs_source_and_output_or_default():
    with pytest.raises(SystemExit, match="give SRC and OUT, or --default"):
        main(["convert", "only_source"])


def test_convert_default_prints_the_cached_checkpoint(checkpoint, tmp_path, monkeypatch, capsys):
    cached = tmp_path / BASE_CHECKPOINT_NAME
    cached.symlink_to(checkpoint, target_is_directory=True)
    monkeypatch.setenv("HF_LAYERSKIP_CACHE", str(tmp_path))
    monkeypatch.setattr("hf_layerskip.defaults.DEFAULT_DRAFT_HEAD_DIR", tmp_path / "no-draft-head")
    monkeypatch.setattr("hf_layerskip.defaults.fetch_default_gguf", _no_download)
    assert main(["convert", "--default"]) == 0
    assert capsys.readouterr().out.strip() == str(cached)


def test_convert_default_base_prints_the_checkpoint_without_the_draft_head(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / BASE_CHECKPOINT_NAME).symlink_to(checkpoint, target_is_directory=True)
    monkeypatch.setenv("HF_LAYERSKIP_CACHE", str(tmp_path))
    monkeypatch.setattr("hf_layerskip.defaults.fetch_default_gguf", _no_download)
    monkeypatch.setattr("hf_layerskip.defaults.build_from_draft_head", _no_download)
    assert main(["convert", "--default", "--base"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / BASE_CHECKPOINT_NAME)
    with pytest.raises(SystemExit, match="--base goes with --default"):
        main(["convert", "--base"])


def test_generate_uses_the_default_checkpoint_without_model(checkpoint, tmp_path, monkeypatch, capsys):
    (tmp_path / BASE_CHECKPOINT_NAME).symlink_to(checkpoint, target_is_directory=True)
    monkeypatch.setenv("HF_LAYERSKIP_CACHE", str(tmp_path))
    monkeypatch.setattr("hf_layerskip.defaults.DEFAULT_DRAFT_HEAD_DIR", tmp_path / "no-draft-head")
    monkeypatch.setattr("hf_layerskip.defaults.fetch_default_gguf", _no_download)
    expected, _, _ = reference_completion(checkpoint)
    assert main(["generate", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def _no_download(*args, **kwargs):
    raise AssertionError("the cached checkpoint should have been used")


@pytest.mark.parametrize("extra", [["--exit-layer", "3"], ["--dtype", "bfloat16"], ["src"]])
def test_convert_default_refuses_other_settings(extra):
    with pytest.raises(SystemExit, match="--default prints the cached checkpoint"):
        main(["convert", *extra, "--default"])


# generate


def test_generate_full_model_streams_the_greedy_completion(checkpoint, capsys):
    expected, new_tokens, _ = reference_completion(checkpoint)
    captured = run_generate(capsys, checkpoint)
    assert captured.out == expected + "\n"
    assert int(SPEED_LINE.search(captured.err).group(1)) == new_tokens
    assert "full model: 6 layers" in captured.err
    assert STATS_LINE.search(captured.err) is None


def test_generate_without_chat_template(checkpoint, capsys):
    expected, _, _ = reference_completion(checkpoint, use_chat_template=False)
    with_template, _, _ = reference_completion(checkpoint)
    assert expected != with_template, "the chat template should change the prompt and hence the completion"
    assert run_generate(capsys, checkpoint, "--no-chat-template").out == expected + "\n"


def test_generate_reads_the_prompt_from_stdin(checkpoint, capsys, monkeypatch):
    expected, _, _ = reference_completion(checkpoint)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert main(["generate", "-", "--model", str(checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_generate_early_exit(checkpoint, capsys):
    expected, new_tokens, _ = reference_completion(checkpoint, early_exit=2)
    captured = run_generate(capsys, checkpoint, "--early-exit", "2")
    assert captured.out == expected + "\n"
    assert int(SPEED_LINE.search(captured.err).group(1)) == new_tokens
    assert "early exit: layers 1-2 of 6" in captured.err


def test_generate_self_speculative_prints_draft_statistics(checkpoint, capsys):
    full_text, _, _ = reference_completion(checkpoint)
    expected, new_tokens, model = reference_completion(checkpoint, assistant_early_exit=2, num_assistant_tokens=3)
    assert expected == full_text  # lossless
    captured = run_generate(capsys, checkpoint, "--assistant-early-exit", "2", "--num-speculations", "3")
    assert captured.out == expected + "\n"
    assert int(SPEED_LINE.search(captured.err).group(1)) == new_tokens
    drafted, accepted, rounds, rate = STATS_LINE.search(captured.err).groups()
    stats = model.speculation_stats
    assert (int(drafted), int(accepted), int(rounds)) == (stats.drafted_tokens, stats.accepted_tokens, stats.rounds)
    assert float(rate) == pytest.approx(stats.acceptance_rate, abs=0.005)
    assert "draft with layers 1-2 of 6, 3 per round" in captured.err


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_convert_and_self_speculative_generate_on_another_family(tmp_path, capsys, family):
    save_tiny_stock(tmp_path / family, family, num_layers=6)
    checkpoint = tmp_path / "layerskip"
    assert main(["convert", str(tmp_path / family), str(checkpoint), "--exit-layer", "2"]) == 0
    capsys.readouterr()
    full_text, _, _ = reference_completion(checkpoint)
    captured = run_generate(capsys, checkpoint, "--assistant-early-exit", "2", "--num-speculations", "3")
    assert captured.out == full_text + "\n"
    assert "draft with layers 1-2 of 6, 3 per round" in captured.err


def test_generate_several_prompts_decodes_them_as_one_batch(checkpoint, capsys):
    """Each printed completion is that prompt's own greedy completion, decoded alone."""
    prompts = [PROMPT, "w5", "w7 w49 w3 w11 w13 w17"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = LayerSkipLlamaForCausalLM.from_pretrained(checkpoint).eval()
    expected, total = [], 0
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
        new_tokens = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
        expected.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        total += len(new_tokens)
    for options in ([], ["--assistant-early-exit", "2", "--num-speculations", "3"]):
        argv = ["generate", *prompts, "--model", str(checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS), *options]
        argv += ["--dtype", "float32"]  # the expected completions are float32's: the default may be bfloat16 here
        assert main(argv) == 0
        captured = capsys.readouterr()
        blocks = re.split(r"^=== completion \d of 3 ===\n", captured.out, flags=re.MULTILINE)
        assert blocks[0] == "" and [block.removesuffix("\n") for block in blocks[1:]] == expected
        assert int(SPEED_LINE.search(captured.err).group(1)) == total


def test_generate_sampling_is_reproducible_with_a_seed(checkpoint, capsys):
    options = ["--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--seed", "4"]
    first = run_generate(capsys, checkpoint, *options).out
    assert run_generate(capsys, checkpoint, *options).out == first
    speculative = run_generate(capsys, checkpoint, "--assistant-early-exit", "2", *options)
    assert STATS_LINE.search(speculative.err) is not None


@pytest.mark.parametrize(
    "options, message",
    [
        (["--num-speculations", "3"], "--num-speculations needs --assistant-early-exit"),
        (["--temperature", "0.5"], "need --do-sample"),
        (["--seed", "1"], "need --do-sample"),
    ],
)
def test_generate_rejects_inconsistent_options(checkpoint, options, message):
    with pytest.raises(SystemExit, match=message):
        main(["generate", PROMPT, "--model", str(checkpoint), *options])


def test_generate_early_exit_and_assistant_are_exclusive(checkpoint):
    with pytest.raises(SystemExit, match="--early-exit and --assistant-early-exit exclude each other"):
        main(["generate", PROMPT, "--model", str(checkpoint), "--early-exit", "2", "--assistant-early-exit", "2"])


def test_generate_refuses_a_plain_llama_directory(tmp_path):
    save_tiny_llama(tmp_path / "llama")
    with pytest.raises(SystemExit, match="not a LayerSkip checkpoint"):
        main(["generate", PROMPT, "--model", str(tmp_path / "llama")])


# --help


def _subparser(name):
    (subparsers,) = [action for action in build_parser()._actions if action.dest == "command"]
    return subparsers.choices[name]


REQUIRED_OPTIONS = {
    "convert": ["--default", "--base", "--dtype", "--trust-remote-code",
                *(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(LayerSkipConfigArguments))],
    "generate": [
        "--model", "--early-exit", "--assistant-early-exit", "--num-speculations", "--max-new-tokens", "--do-sample",
        "--temperature", "--top-p", "--seed", "--no-chat-template", "--dtype", "--device",
    ],
}


@pytest.mark.parametrize("command", ["convert", "generate"])
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    actions = [action for action in _subparser(command)._actions if action.option_strings]
    documented = {option for action in actions for option in action.option_strings}
    assert set(REQUIRED_OPTIONS[command]) <= documented
    for action in actions:
        assert action.help, f"{action.option_strings} has no help text"
        assert action.option_strings[-1] in help_text
    for action in _subparser(command)._actions:
        if not action.option_strings:
            assert action.metavar in help_text and action.help
