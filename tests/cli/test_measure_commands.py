"""`benchmark`, `sweep`, `layers` and `correctness` end to end on a tiny offline checkpoint."""

import argparse
import csv
import importlib
import json

import matplotlib.image
import pytest
import torch
from generation.measure_helpers import save_tiny_checkpoint, write_prompts, write_texts
from transformers import AutoTokenizer

import hf_layerskip.modeling.self_speculative as self_speculative
from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.cli import SUBCOMMANDS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEASURE_COMMANDS = ("benchmark", "sweep", "layers", "correctness")


def run_command(name: str, *argv) -> int:
    """Parses and runs one subcommand in-process (so that monkeypatches apply)."""
    parser = argparse.ArgumentParser()
    importlib.import_module(f"hf_layerskip.cli.{name}").add_parser(parser.add_subparsers())
    args = parser.parse_args([name, *map(str, argv)])
    return args.run(args)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(path).ndim == 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("measure")
    return {
        "model": save_tiny_checkpoint(root / "tiny"),
        "other": save_tiny_checkpoint(root / "tiny_other", seed=1),
        "prompts": write_prompts(root / "prompts.jsonl", count=3),
        "texts": write_texts(root / "texts.jsonl"),
    }


def prompt_options(files):
    return [
        "--model",
        files["model"],
        "--prompts",
        "jsonl",
        "--prompts-file",
        files["prompts"],
        "--prompt-field",
        "question",
        "--reference-field",
        "answer",
        "--id-field",
        "name",
        "--no-progress",
    ]


def test_measure_commands_are_registered_and_explain_every_option(capsys):
    assert set(MEASURE_COMMANDS) <= set(SUBCOMMANDS)
    for name in MEASURE_COMMANDS:
        parser = argparse.ArgumentParser()
        importlib.import_module(f"hf_layerskip.cli.{name}").add_parser(parser.add_subparsers())
        (subparser,) = parser._subparsers._group_actions[0].choices.values()
        undocumented = [a.dest for a in subparser._actions if not a.help]
        assert undocumented == [], f"{name}: options without help: {undocumented}"


def test_benchmark_reports_every_strategy(files, tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = [*prompt_options(files), "--max-new-tokens", 8, "--exit-layer", 2, "--num-speculations", 2]
    assert (
        run_command("benchmark", *argv, "--output", output, "--markdown", tmp_path / "bench.md", "--cost-repeats", 2)
        == 0
    )
    result = json.loads(output.read_text())
    by_kind = {s["kind"]: s for s in result["strategies"]}
    assert list(by_kind) == ["plain", "early_exit", "self_speculative", "builtin"]
    for summary in by_kind.values():
        assert summary["prompts"] == 3 and summary["new_tokens"] == 24 and summary["rouge_l"] is not None
    assert by_kind["plain"]["speedup"] == pytest.approx(1.0)
    assert by_kind["self_speculative"]["mismatches"] == 0 and by_kind["builtin"]["mismatches"] == 0
    # Both speculative paths draft greedily from the same exit, so they accept the same tokens.
    assert by_kind["self_speculative"]["acceptance_rate"] == pytest.approx(by_kind["builtin"]["acceptance_rate"])
    (bound,) = result["speedup_bounds"]
    assert (bound["exit_layer"], bound["num_speculations"]) == (2, 2)
    assert bound["measured_speedup"] == pytest.approx(by_kind["self_speculative"]["speedup"])
    assert [row["id"] for row in result["per_prompt"]] == ["p0", "p1", "p2"]
    printed = capsys.readouterr().out
    assert "| self_speculative(E=2,d=2) |" in printed and "ideal speedup" in printed
    assert (tmp_path / "bench.md").read_text().strip() in printed


def test_benchmark_runs_the_builtin_path_at_its_own_pair_and_a_threshold(files, tmp_path):
    output = tmp_path / "bench.json"
    argv = [*prompt_options(files), "--max-new-tokens", 8, "--exit-layer", 2, "--num-speculations", 3]
    argv += ["--first-prompt", 1, "--num-prompts", 2]
    argv += ["--strategies", "self_speculative,builtin", "--builtin-pair", "4:1", "--confidence-threshold", 0.02]
    assert run_command("benchmark", *argv, "--output", output, "--cost-repeats", 2) == 0
    result = json.loads(output.read_text())
    assert [row["id"] for row in result["per_prompt"]] == ["p1", "p2"]
    names = [s["strategy"] for s in result["strategies"]]
    assert names == ["plain", "self_speculative(E=2,d=3,t=0.02)", "builtin(E=4,d=1)"]
    assert all(s["mismatches"] == 0 for s in result["strategies"])
    (bound,) = result["speedup_bounds"]
    # A threshold withholds drafts: the bound counts the draft steps that ran, not d.
    assert bound["draft_steps_per_round"] == pytest.approx(result["strategies"][1]["mean_draft_steps_per_round"])
    with pytest.raises(SystemExit, match="one E:d pair"):
        run_command("benchmark", *argv[:-4], "--builtin-pair", "4:1,6:2", "--output", output)


def test_benchmark_tokens_follow_plain_greedy(files, tmp_path):
    """The benchmark's plain outputs are the model's greedy continuation of each prompt."""
    output = tmp_path / "bench.json"
    argv = [*prompt_options(files), "--max-new-tokens", 5, "--strategies", "plain", "--warmup", 0]
    assert run_command("benchmark", *argv, "--output", output) == 0
    result = json.loads(output.read_text())
    assert [s["kind"] for s in result["strategies"]] == ["plain"] and result["speedup_bounds"] == []
    assert result["settings"]["warmup_prompts"] == 0
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = LayerSkipLlamaForCausalLM.from_pretrained(files["model"]).eval()
    for line, row in zip(files["prompts"].read_text().splitlines(), result["per_prompt"]):
        input_ids = tokenizer(json.loads(line)["question"], return_tensors="pt").input_ids
        new_tokens = model.generate(input_ids, do_sample=False, max_new_tokens=5)[0, input_ids.shape[1] :]
        assert row["plain"]["text"] == tokenizer.decode(new_tokens, skip_special_tokens=True)


def count_generate_calls(monkeypatch) -> list:
    calls = []
    generate = LayerSkipLlamaForCausalLM.generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("assistant_early_exit"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LayerSkipLlamaForCausalLM, "generate", counting)
    return calls


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_sweep_resumes_where_it_stopped(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = [*prompt_options(files), "--max-new-tokens", 6, "--exit-layers", "2,4", "--num-speculations", "1-2"]
    argv += ["--output-dir", out, "--no-warmup"]
    calls = count_generate_calls(monkeypatch)

    assert run_command("sweep", *argv, "--max-cells", 2) == 0
    first_rows = read_csv(out / "sweep.csv")
    assert [(r["exit_layer"], r["num_speculations"]) for r in first_rows] == [("2", "1"), ("2", "2")]
    assert calls == [None] * 3 + [2] * 6  # plain baseline on 3 prompts, then 2 cells x 3 prompts
    assert_png(out / "speedup_heatmap.png")
    assert "2 pending" in capsys.readouterr().out

    calls.clear()
    assert run_command("sweep", *argv) == 0
    assert calls == [4] * 6  # only the two remaining cells; the plain baseline comes from plain.csv
    rows = read_csv(out / "sweep.csv")
    assert rows[:2] == first_rows and len(rows) == 4
    assert {(r["exit_layer"], r["num_speculations"]) for r in rows} == {("2", "1"), ("2", "2"), ("4", "1"), ("4", "2")}
    assert all(r["mismatches"] == "0" for r in rows)
    plain_rows = read_csv(out / "plain.csv")
    plain_ms = 1000 * sum(float(r["seconds"]) for r in plain_rows) / sum(int(r["new_tokens"]) for r in plain_rows)
    for row in rows:  # every cell is compared with the one cached baseline
        assert float(row["plain_ms_per_token"]) == pytest.approx(plain_ms)
        assert float(row["speedup"]) == pytest.approx(plain_ms / float(row["ms_per_token"]))
    best = max(rows, key=lambda r: float(r["speedup"]))
    printed = capsys.readouterr().out
    assert f"best exact cell: self_speculative(E={best['exit_layer']},d={best['num_speculations']})" in printed
    assert "2 were already done" in printed
    assert_png(out / "speedup_heatmap.png")

    calls.clear()
    assert run_command("sweep", *argv) == 0
    assert calls == []  # nothing left to do
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_command("sweep", *[a if a != 6 else 7 for a in argv])


def test_paired_sweep_times_plain_inside_every_cell(files, tmp_path, monkeypatch):
    out = tmp_path / "paired"
    argv = [*prompt_options(files), "--max-new-tokens", 6, "--exit-layers", "3", "--num-speculations", "1,2"]
    calls = count_generate_calls(monkeypatch)
    assert run_command("sweep", *argv, "--output-dir", out, "--no-warmup", "--paired") == 0
    # The cached baseline, then per cell: plain and speculative alternating prompt by prompt.
    assert calls == [None] * 3 + [None, 3] * 6
    for row in read_csv(out / "sweep.csv"):
        assert float(row["speedup"]) == pytest.approx(float(row["plain_ms_per_token"]) / float(row["ms_per_token"]))
    with pytest.raises(ValueError, match="paired"):
        run_command("sweep", *argv, "--output-dir", out)


def test_layers_overlays_two_checkpoints(files, tmp_path, capsys):
    csv_path, plot_path = tmp_path / "layers.csv", tmp_path / "layers.png"
    argv = ["--model", files["model"], "--compare", files["other"], "--labels", "seed0", "seed1", "--no-progress"]
    argv += ["--text", files["texts"], "--csv", csv_path, "--plot", plot_path]
    assert run_command("layers", *argv) == 0
    rows = read_csv(csv_path)
    assert [(r["model"], int(r["layer"])) for r in rows] == [(m, n) for m in ("seed0", "seed1") for n in range(1, 7)]
    texts = [json.loads(line)["text"] for line in files["texts"].read_text().splitlines()]
    predicted = sum(len(t.split()) - 1 for t in texts)
    assert all(int(r["tokens"]) == predicted for r in rows)
    assert float(rows[5]["top1_agreement"]) == 1.0 and float(rows[11]["top1_agreement"]) == 1.0
    assert rows[0]["perplexity"] != rows[6]["perplexity"]  # two different models
    assert_png(plot_path)
    with pytest.raises(SystemExit, match="2 labels"):
        run_command(
            "layers",
            "--model",
            files["model"],
            "--compare",
            files["other"],
            "--labels",
            "one",
            "--text",
            files["texts"],
        )


def test_correctness_passes_and_catches_a_broken_decoder(files, tmp_path, monkeypatch, capsys):
    argv = [*prompt_options(files), "--max-new-tokens", 10, "--pairs", "2:1,4:3", "--output", tmp_path / "checks.json"]
    assert run_command("correctness", *argv) == 0
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert len(checks) == 6 and all(c["mismatch_position"] is None for c in checks)
    assert "0 mismatches in 6 checks" in capsys.readouterr().out

    accept = self_speculative.accept_greedy_rows

    def broken(draft_tokens, target_scores):
        # Every row's full-model token after its accepted drafts comes out wrong.
        num_accepted, tokens = accept(draft_tokens, target_scores)
        tokens, rows = tokens.clone(), torch.arange(len(tokens))
        tokens[rows, num_accepted] = (tokens[rows, num_accepted] + 1) % 128
        return num_accepted, tokens

    monkeypatch.setattr(self_speculative, "accept_greedy_rows", broken)
    assert run_command("correctness", *argv) == 1
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert all(c["mismatch_position"] is not None and c["is_tie"] is False for c in checks)
    printed = capsys.readouterr().out
    assert "MISMATCH p0 E=2 d=1: first mismatch at new token" in printed and "not a tie" in printed


def test_bad_arguments_name_the_problem(files):
    with pytest.raises(SystemExit, match=r"exit layers must be in \[1, 5\].*\[6\]"):
        run_command("correctness", *prompt_options(files), "--pairs", "6:2")
    with pytest.raises(SystemExit, match="unknown strategies"):
        run_command("benchmark", *prompt_options(files), "--strategies", "plain,medusa")
    with pytest.raises(SystemExit):
        run_command("sweep", *prompt_options(files), "--exit-layers", "two")
