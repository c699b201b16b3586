"""`hf-layerskip` itself: a command that needs an optional package it lacks names the extra that installs it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import tiny_checkpoint  # noqa: E402

from hf_layerskip.cli import main  # noqa: E402


def test_a_gguf_source_without_gguf_names_the_gguf_extra(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"hf-layerskip convert: needs .*gguf.*pip install 'hf_layerskip\[gguf\]'"):
        main(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "out")])


def test_lora_training_without_peft_names_the_peft_extra(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "notes.txt").write_text("some text " * 40)
    monkeypatch.setitem(sys.modules, "peft", None)
    argv = ["train", "--model", str(tmp_path / "tiny"), "--train_files", str(tmp_path / "notes.txt"), "--seq_length",
            "16", "--lora_r", "2", "--output_dir", str(tmp_path / "run"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"hf-layerskip train: needs the peft package.*'hf_layerskip\[peft\]'"):
        main(argv)


def test_other_missing_modules_are_not_hidden(monkeypatch):
    def missing(args):
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr("hf_layerskip.cli.generate.run", missing)
    with pytest.raises(ModuleNotFoundError, match="not_an_extra"):
        main(["generate", "hi"])
