"""`throughput` end to end on a tiny offline checkpoint, and its options."""

import argparse
import json

import matplotlib.image
import pytest
from generation.measure_helpers import prompt_words, save_tiny_checkpoint

from hf_layerskip.cli import SUBCOMMANDS, build_parser
from hf_layerskip.cli.parsing import dataclasses_from
from hf_layerskip.cli.throughput import ARGUMENT_TYPES, STRATEGY_HELP, add_parser
from hf_layerskip.generation.throughput import STRATEGIES

PROMPT_LENGTHS = (7, 3, 5, 2, 6)  # different lengths, so that batches need padding


def throughput_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser


def run_command(*argv) -> int:
    """Parses and runs `throughput` in-process."""
    args = throughput_parser().parse_args(["throughput", *map(str, argv)])
    return args.run(args)


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput")
    prompts = root / "prompts.jsonl"
    records = [{"name": f"p{i}", "question": prompt_words(i, n)} for i, n in enumerate(PROMPT_LENGTHS)]
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"model": save_tiny_checkpoint(root / "tiny"), "prompts": prompts}


def options(files, *argv):
    return ["--model", files["model"], "--prompts", "jsonl", "--prompts-file", files["prompts"], "--prompt-field",
            "question", "--id-field", "name", "--no-progress", "--exit-layer", 2, "--num-speculations", 2,
            *argv]  # fmt: skip


def test_throughput_is_registered_and_explains_every_option():
    assert "throughput" in SUBCOMMANDS and list(STRATEGY_HELP) == list(STRATEGIES)
    (subparser,) = throughput_parser()._subparsers._group_actions[0].choices.values()
    undocumented = [a.dest for a in subparser._actions if not a.help]
    assert undocumented == []


def test_throughput_writes_json_markdown_and_plot(files, tmp_path, capsys):
    output, markdown = tmp_path / "runs" / "throughput.json", tmp_path / "tables" / "throughput.md"
    argv = options(files, "--batch-sizes", "1,2,4", "--num-prompts", 4, "--first-prompt", 1, "--max-new-tokens", 4)
    assert run_command(*argv, "--output", output, "--markdown", markdown) == 0
    result = json.loads(output.read_text())
    keys = [(r["batch_size"], r["strategy"]) for r in result["results"]]
    assert keys == [(b, s) for b in (1, 2, 4) for s in STRATEGIES]
    for row in result["results"]:  # the tiny model has no EOS: every row runs to the token budget
        assert (row["groups"], row["rows"], row["new_tokens"], row["mismatches"]) == (4 // row["batch_size"], 4, 16, 0)
        assert row["tokens_per_s"] == pytest.approx(16 / row["seconds"])
    plain = {r["batch_size"]: r["tokens_per_s"] for r in result["results"] if r["strategy"] == "plain"}
    for row in result["results"]:
        assert row["speedup_vs_plain"] == pytest.approx(row["tokens_per_s"] / plain[row["batch_size"]])
        assert row["speedup_vs_plain_batch_1"] == pytest.approx(row["tokens_per_s"] / plain[1])
    assert {"cpu_count", "torch", "device"} <= set(result["machine"])
    settings = result["settings"]
    assert settings["prompt_ids"] == ["p1", "p2", "p3", "p4"] and settings["batch_sizes"] == [1, 2, 4]
    assert (settings["exit_layer"], settings["num_speculations"], settings["confidence_threshold"]) == (2, 2, 0.0)
    assert len(result["groups"]) == 3 * (4 + 2 + 1) and all(g["mismatches"] == 0 for g in result["groups"])
    printed = capsys.readouterr().out
    assert "| 4 | self_speculative_loop | 16 |" in printed
    note = "0 expected" if settings["dtype"] == "float32" else "0 expected in float32; half precision may part at numerical near-ties"
    assert f"rows differing from plain batched greedy decoding: 0 ({note})" in printed
    assert settings["repeats"] == 3  # the default
    assert markdown.read_text().strip() in printed
    assert_png(output.with_suffix(".png"))


def test_the_plot_goes_where_asked(files, tmp_path):
    argv = options(files, "--batch-sizes", "1", "--num-prompts", 1, "--max-new-tokens", 2, "--warmup", 0)
    assert run_command(*argv, "--output", tmp_path / "t.json", "--plot", tmp_path / "plots" / "plot.png") == 0
    assert_png(tmp_path / "plots" / "plot.png")
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("spelling", ["underscores", "dashes"])
def test_options_take_both_spellings_and_the_commands_defaults(spelling):
    def flag(name):
        return "--" + (name if spelling == "underscores" else name.replace("_", "-"))

    argv = ["throughput", flag("batch_sizes"), "8,1-2", flag("num_prompts"), "5", flag("max_new_tokens"), "3"]
    parsed = dataclasses_from(build_parser().parse_args(argv), ARGUMENT_TYPES)
    assert (parsed[2].num_prompts, parsed[3].max_new_tokens, parsed[-1].batch_sizes) == (5, 3, (1, 2, 8))
    defaults = dataclasses_from(build_parser().parse_args(["throughput"]), ARGUMENT_TYPES)
    assert (defaults[2].num_prompts, defaults[3].max_new_tokens, defaults[-1].batch_sizes) == (16, 64, (1, 2, 4, 8))
    assert (defaults[-1].output, defaults[-1].plot, defaults[-1].warmup) == ("throughput.json", None, 1)


def test_bad_arguments_name_the_problem(files):
    with pytest.raises(SystemExit, match="batch sizes must be at least 1"):
        run_command(*options(files, "--batch-sizes", "0,2"))
    with pytest.raises(SystemExit, match="--warmup must be at least 0"):
        run_command(*options(files, "--warmup", -1))
    with pytest.raises(SystemExit, match=r"exit layers must be in \[1, 5\]"):
        run_command(*options(files, "--exit-layer", 6))
