"""`hf-layerskip train-draft` end to end on a tiny offline checkpoint: the checkpoint it writes, its report, and a
rerun that resumes without generating or training again."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
from measure_helpers import save_tiny_checkpoint  # noqa: E402

import hf_layerskip.trainer.exit_adapters as exit_adapters  # noqa: E402
import hf_layerskip.trainer.self_distillation as self_distillation  # noqa: E402
from hf_layerskip import LayerSkipLlamaForCausalLM  # noqa: E402
from hf_layerskip.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def command(model: Path, output: Path, *extra) -> list[str]:
    return [
        "train-draft",
        "--model", str(model),
        "--output-dir", str(output),
        "--exit_layers", "2,3",
        "--draft-vocab-size", "64",
        "--stdlib-prompts", "4",
        "--humaneval-prompts", "5",
        "--held-out-texts", "2",
        "--max-new-tokens", "6",
        "--generation-batch-size", "2",
        "--epochs", "2",
        "--batch-size", "16",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def test_train_draft_writes_a_checkpoint_with_its_draft_head_and_resumes(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny_checkpoint(tmp_path / "tiny")
    output = tmp_path / "draft"
    assert main(command(model_dir, output)) == 0
    trained = LayerSkipLlamaForCausalLM.from_pretrained(output)
    base = LayerSkipLlamaForCausalLM.from_pretrained(model_dir)
    assert trained.config.exit_adapter_layers == [2, 3] and trained.config.draft_vocab_size == 64
    # The model itself is unchanged: only the draft head is new.
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor), name
    assert trained.draft_head.adapter(2).up.abs().sum() > 0
    report = json.loads((output / "report.json").read_text())
    assert report["draft_vocab_size"] == 64 and 0 < report["draft_vocab_coverage"] <= 1
    assert set(report["exits"]) == {"2", "3"}
    assert set(report["exits"]["2"]) == {"without_adapter", "with_adapter"}
    assert "confident@0.5" in report["exits"]["2"]["with_adapter"]

    def refuse(*args, **kwargs):
        raise AssertionError("a rerun must reuse what the first run made")

    monkeypatch.setattr(exit_adapters, "train_exit_adapter", refuse)
    monkeypatch.setattr(self_distillation, "greedy_continuations", refuse)
    capsys.readouterr()
    assert main(command(model_dir, output)) == 0
    rerun = LayerSkipLlamaForCausalLM.from_pretrained(output)
    for name, tensor in trained.draft_head.state_dict().items():
        assert torch.equal(rerun.draft_head.state_dict()[name], tensor), name
    # Other training settings train anew.
    monkeypatch.undo()
    assert main(command(model_dir, tmp_path / "other", "--work-dir", str(output / "work"), "--epochs", "1")) == 0


def test_held_out_humaneval_problems_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"humaneval_prompts.*\[0, 124\].*got 130"):
        main(["train-draft", "--humaneval-prompts", "130", "--output-dir", str(tmp_path)])
