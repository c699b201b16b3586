"""`hf-layerskip train`: help, YAML config with command-line overrides, input errors before training, full and
LoRA runs on a tiny checkpoint, resume, and a short LoRA run on SmolLM2 (real_model)."""

import dataclasses
import json
import re
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_helpers import tiny_checkpoint  # noqa: E402

import hf_layerskip.cli.train as train_cli  # noqa: E402
from hf_layerskip.cli import build_parser, main  # noqa: E402
from hf_layerskip.cli.parsing import dataclasses_from  # noqa: E402
from hf_layerskip.trainer import LayerSkipTrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "2",
    "--logging_steps", "1",
]  # fmt: skip


def train_subparser():
    parser = build_parser()
    (subparsers,) = [action for action in parser._actions if action.dest == "command"]
    return subparsers.choices["train"]


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "tiny"
    tiny_checkpoint(directory)
    return directory


@pytest.fixture
def corpus(tmp_path):
    """Training text in all three formats."""
    (tmp_path / "code.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    (tmp_path / "notes.jsonl").write_text(
        "".join(json.dumps({"text": f"note {i}: " + "x" * 40}) + "\n" for i in range(8))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row " * 10] * 4}), tmp_path / "rows.parquet")
    return [str(tmp_path / name) for name in ("code.py", "notes.jsonl", "rows.parquet")]


def test_help_documents_every_option(capsys):
    parser = train_subparser()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert re.search(rf"(^|[\s,]){re.escape(option)}\b", help_text), f"{option} missing from --help"
    for name in ("--config", "--model", "--train_files", "--seq_length", "--lora_r", "--layer_dropout_max",
                 "--early_exit_curriculum", "--resume_from_checkpoint", "--output_dir"):  # fmt: skip
        assert name in help_text
    assert "(default: 2048)" in help_text and "SUPPRESS" not in help_text


def test_yaml_config_with_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "learning_rate: 1e-4\n"  # YAML reads this as a string; it must still become a float
        "max_steps: 5\n"
        "warmup_steps: 2\n"
        "early_exit_curriculum: gradual\n"
        "lora_r: 4\n"
        "bf16: false\n"
        "train_files: [a.txt, b.jsonl]\n"
        "layer_dropout_layers: [1, 2]\n"
        "lora_target_modules: q_proj\n"  # one value for a list option
    )
    # Flags override the file wherever they stand, before or after --config, in either spelling.
    argv = ["train", "--warmup-steps", "3", "--config", str(config), "--max-steps", "7", "--lora_alpha", "3",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    script, lora, training = dataclasses_from(build_parser().parse_args(argv), train_cli.ARGUMENT_TYPES)
    assert training.learning_rate == 1e-4 and isinstance(training.learning_rate, float)
    assert (training.max_steps, training.warmup_steps) == (7, 3)
    assert training.early_exit_curriculum == "gradual" and training.layer_dropout_layers == [1, 2]
    assert training.bf16 is False and training.output_dir == str(tmp_path / "run")
    assert (lora.lora_r, lora.lora_alpha, lora.lora_target_modules) == (4, 3.0, ["q_proj"])
    assert script.train_files == ["a.txt", "b.jsonl"]

    # Whatever neither the file nor the flags set keeps the default its dataclass declares.
    declared = dict(zip(train_cli.ARGUMENT_TYPES, (train_cli.TrainScriptArguments(), train_cli.LoraArguments(),
                                                   LayerSkipTrainingArguments(output_dir=str(tmp_path / "run")))))  # fmt: skip
    given = {"learning_rate", "max_steps", "warmup_steps", "early_exit_curriculum", "lora_r", "bf16", "train_files",
             "layer_dropout_layers", "lora_target_modules", "lora_alpha", "output_dir", "config"}  # fmt: skip
    for parsed in (script, lora, training):
        for field in dataclasses.fields(parsed):
            if field.init and field.name not in given:
                expected = getattr(declared[type(parsed)], field.name)
                assert getattr(parsed, field.name) == expected, field.name


def test_a_bad_config_file_stops_the_command_with_its_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("max_steps: 5\nwarmup_stepz: 3\n")
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(tmp_path / "run.yaml"), "--train_files", "x.txt"])
    assert stop.value.code == 2
    assert re.search(r"hf-layerskip train: error: .*run\.yaml:2: unknown option 'warmup_stepz'", capsys.readouterr().err)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("max_steps: 5\nlearning_rate: 1e-4\nwarmup_stepz: 3\n", r"run\.yaml:3: unknown option 'warmup_stepz'"),
        ("max_steps: many\n", r"run\.yaml:1: bad value 'many' for 'max_steps'"),
        ("early_exit_curriculum: sideways\n", r"run\.yaml:1: bad value 'sideways'"),
        ("max_steps: [1\n", r"run\.yaml:2: malformed YAML"),
        ("- max_steps\n", r"run\.yaml: expected a mapping"),
    ],
)
def test_config_file_errors_name_the_file_and_line(tmp_path, text, pattern):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=pattern):
        train_cli.load_config_file(tmp_path / "run.yaml")


def run_train(argv, monkeypatch=None):
    """Runs `hf-layerskip train`, returning the SystemExit message (None on success)."""
    try:
        main(["train", *argv])
    except SystemExit as stop:
        return str(stop)
    return None


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing", r"Data file not found: .*missing\.jsonl"),
        ("empty", r"Data file is empty: .*empty\.txt"),
        ("malformed", r"bad\.jsonl:2: malformed JSON line"),
        ("no_text", r"keys\.jsonl:1: no 'text' column"),
        ("too_long", r"seq_length`=65 is longer than the model allows: max_position_embeddings=64 in .*config\.json"),
    ],
)
def test_bad_input_stops_before_any_training(tmp_path, checkpoint, monkeypatch, case, pattern):
    built = []
    monkeypatch.setattr(train_cli, "_build_trainer", lambda *args: built.append(args))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp_path / "keys.jsonl").write_text('{"body": "no text column"}\n')
    (tmp_path / "good.txt").write_text("some text " * 20)
    files = {"missing": "missing.jsonl", "empty": "empty.txt", "malformed": "bad.jsonl", "no_text": "keys.jsonl"}
    seq_length = "65" if case == "too_long" else "16"
    data = str(tmp_path / files.get(case, "good.txt"))
    message = run_train(["--model", str(checkpoint), "--train_files", data, "--seq_length", seq_length, *QUICK])
    assert message is not None and re.search(pattern, message), message
    assert message.startswith("hf-layerskip train: ")
    assert not built


def test_full_run_saves_a_layerskip_checkpoint_and_resumes_from_the_latest(tmp_path, checkpoint, corpus):
    output = tmp_path / "run"
    common = ["--model", str(checkpoint), "--train_files", *corpus, "--seq_length", "32", "--output_dir", str(output)]
    assert run_train([*common, "--max_steps", "2", "--save_steps", "2", *QUICK]) is None
    trained = AutoModelForCausalLM.from_pretrained(output)
    assert type(trained).__name__ == "LayerSkipLlamaForCausalLM"
    original = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)
    assert (output / "checkpoint-2").is_dir() and (output / "tokenizer.json").is_file()

    assert run_train([*common, "--max_steps", "3", "--resume_from_checkpoint", "latest", *QUICK]) is None
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]


def test_lora_run_saves_an_adapter_that_loads_on_the_layerskip_model(tmp_path, checkpoint, corpus):
    from peft import PeftModel

    output = tmp_path / "adapter"
    argv = ["--model", str(checkpoint), "--train_files", *corpus, "--seq_length", "32", "--output_dir", str(output),
            "--max_steps", "2", "--lora_r", "4", "--learning_rate", "1e-2", "--save_strategy", "no",
            *QUICK]  # fmt: skip
    assert run_train(argv) is None
    assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    adapted = PeftModel.from_pretrained(base, output)
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in adapted.named_parameters())


@pytest.mark.real_model
def test_short_lora_run_on_smollm2(tmp_path, smollm2_checkpoint):
    """A few LoRA steps on SmolLM2 on CPU; the adapter loads and self-speculative greedy equals plain greedy."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    output = tmp_path / "smollm2-adapter"
    argv = ["--config", str(ROOT / "hf_layerskip" / "recipes" / "continual_pretraining.yaml"), "--model", str(smollm2_checkpoint),
            "--train_files", str(stdlib / "bisect.py"), str(stdlib / "heapq.py"), "--seq_length", "64",
            "--max_steps", "3", "--gradient_accumulation_steps", "1", "--lora_r", "8", "--warmup_steps", "0",
            "--save_strategy", "no", "--output_dir", str(output), *QUICK]  # fmt: skip
    assert run_train(argv) is None
    assert (output / "adapter_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_checkpoint), output).eval()
    prompt = tokenizer("def binary_search(items, target):", return_tensors="pt")
    greedy = dict(max_new_tokens=12, do_sample=False)
    plain = adapted.generate(**prompt, **greedy)
    speculative = adapted.generate(**prompt, assistant_early_exit=8, **greedy)
    assert torch.equal(speculative, plain)
