"""`hf-layerskip train-lora`: the shipped recipe, and the three stages on a tiny checkpoint, resuming."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import tiny_checkpoint  # noqa: E402

import hf_layerskip.cli.train_lora as train_lora  # noqa: E402
from hf_layerskip.cli import main  # noqa: E402
from hf_layerskip.defaults import SETTINGS_FILE_NAME  # noqa: E402

TINY_RECIPE = """
self_distillation:
  num_prompts: 3
  max_new_tokens: 6
  batch_size: 2
seq_length: 32
lora_r: 2
early_exit_curriculum: fixed
early_exit_layers: [1]
early_exit_layer_weighting: uniform
early_exit_loss_scale: 1.0
distillation_weight: 0.5
per_device_train_batch_size: 2
max_steps: 2
save_steps: 1
use_cpu: true
report_to: none
disable_tqdm: true
"""


def test_shipped_recipe_loads_with_typed_options():
    distillation, options = train_lora.load_recipe(train_lora.DEFAULT_RECIPE)
    assert distillation["num_prompts"] > 0 and distillation["max_new_tokens"] > 0
    assert options["early_exit_curriculum"] == "fixed" and options["early_exit_layers"] == [11]
    assert options["lora_r"] == 16 and isinstance(options["learning_rate"], float)
    assert options["distillation_weight"] == 1.0


def test_unknown_distillation_setting_names_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("self_distillation:\n  num_prompt: 3\n")
    with pytest.raises(SystemExit, match=r"recipe\.yaml: unknown self_distillation settings \['num_prompt'\]"):
        main(["train-lora", "--recipe", str(recipe), "--work-dir", str(tmp_path / "work")])


def test_stages_run_once_and_the_adapter_is_exported(tmp_path, monkeypatch, capsys, one_thread):
    tiny_checkpoint(tmp_path / "base")
    monkeypatch.setattr("hf_layerskip.defaults.base_checkpoint", lambda: tmp_path / "base")
    prompts = ["def add(a, b):\n", "def neg(x):\n", "def one():\n", "def two():\n"]
    monkeypatch.setattr("hf_layerskip.trainer.self_distillation.stdlib_function_prompts", lambda seed: prompts)
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    work = tmp_path / "work"
    argv = ["train-lora", "--recipe", str(tmp_path / "recipe.yaml"), "--work-dir", str(work)]
    assert main(argv + ["--exit-layer", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(work / "adapter"))
    rows = [json.loads(line)["text"] for line in (work / "data" / "shard-00000.jsonl").read_text().splitlines()]
    assert [row[: len(prompt)] for row, prompt in zip(rows, prompts)] == prompts[:3] and len(rows) == 3
    assert sorted(path.name for path in (work / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    exported = load_file(work / "adapter" / "adapter_model.safetensors")
    trained = load_file(work / "run" / "adapter_model.safetensors")
    assert {value.dtype for value in exported.values()} == {torch.bfloat16}
    for key, value in trained.items():
        torch.testing.assert_close(exported[key].float(), value.to(torch.bfloat16).float())
    assert json.loads((work / "adapter" / SETTINGS_FILE_NAME).read_text()) == {"exit_layer": 2}

    # Rerunning finds data and training done and only exports again, with the new settings.
    monkeypatch.setattr("hf_layerskip.cli.train.train", lambda *options: pytest.fail("training ran again"))
    monkeypatch.setattr(
        "hf_layerskip.trainer.self_distillation.stdlib_function_prompts",
        lambda seed: pytest.fail("prompts were collected (and the model loaded) again"),
    )
    monkeypatch.setattr(
        "hf_layerskip.trainer.self_distillation.greedy_continuations",
        lambda *args, **kwargs: pytest.fail("data was generated again"),
    )
    assert main(argv + ["--exit-layer", "3", "--num-speculations", "2"]) == 0
    assert json.loads((work / "adapter" / SETTINGS_FILE_NAME).read_text()) == {"exit_layer": 3, "num_speculations": 2}


def test_an_interrupted_training_resumes_from_its_newest_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-1").mkdir(parents=True)
    seen = []
    monkeypatch.setattr("hf_layerskip.cli.train.train", lambda *options: seen.append(options))
    train_lora.train(tmp_path / "base", [tmp_path / "data.jsonl"], run_dir, {"max_steps": 5, "lora_r": 2})
    ((script, lora, training),) = seen
    assert training.resume_from_checkpoint == "latest" and training.max_steps == 5 and lora.lora_r == 2
    assert script.train_files == [str(tmp_path / "data.jsonl")] and training.output_dir == str(run_dir)
    assert script.model == str(tmp_path / "base")
