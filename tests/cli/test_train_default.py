"""`hf-layerskip train-default`: rebuilds the shipped draft head with `train-draft`'s defaults and the shipped
head's own shape and decoding settings."""

import json

import hf_layerskip.cli.train_draft as train_draft
from hf_layerskip.cli import main
from hf_layerskip.defaults import SETTINGS_FILE_NAME
from hf_layerskip.trainer.exit_adapters import ExitAdapterTrainingArguments


def test_train_default_runs_train_draft_with_the_shipped_settings(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    settings = {
        "exit_adapter_layers": [4, 6],
        "exit_adapter_rank": 32,
        "draft_vocab_size": 2048,
        "exit_layer": 6,
        "num_speculations": 5,
        "assistant_confidence_threshold": 0.4,
    }
    (shipped / SETTINGS_FILE_NAME).write_text(json.dumps(settings))
    monkeypatch.setattr("hf_layerskip.defaults.DEFAULT_DRAFT_HEAD_DIR", shipped)
    calls = []
    monkeypatch.setattr(train_draft, "train_draft", lambda *args, progress: calls.append((*args, progress)))
    assert main(["train-default", "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    ((options, adapter_args, progress),) = calls
    assert progress is False
    assert list(options.exit_layers) == [4, 6] and options.draft_vocab_size == 2048
    assert (options.exit_layer, options.num_speculations, options.assistant_confidence_threshold) == (6, 5, 0.4)
    assert options.export_dir == str(tmp_path / "work" / "draft_head")
    assert options.model is None  # SmolLM2 as it is
    # Everything else is train-draft's defaults, the recipe the shipped head was trained with.
    assert adapter_args == ExitAdapterTrainingArguments(exit_adapter_rank=32)
    defaults = train_draft.TrainDraftArguments()
    for name in ("stdlib_prompts", "humaneval_prompts", "max_new_tokens", "held_out_texts", "max_length"):
        assert getattr(options, name) == getattr(defaults, name), name
