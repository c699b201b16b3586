"""`hf-layerskip train`: continual pretraining or fine-tuning with the LayerSkip recipe, or a LoRA adapter.

Options are the fields of `TrainScriptArguments`, `LoraArguments` and `LayerSkipTrainingArguments` (so every
`transformers.TrainingArguments` option too), each as `--name` or `--name-with-dashes`. `--config FILE.yaml` gives
options as `name: value` pairs; options on the command line override it.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..trainer.data import DEFAULT_SAMPLE_BY, SAMPLE_BY_CHOICES
from ..trainer.training_args import LayerSkipTrainingArguments
from . import parsing
from .parsing import KeepParagraphsHelpFormatter, add_dataclass_command, dataclasses_from

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESUME_LATEST = ("true", "latest", "auto")

EXAMPLES = """examples:
  hf-layerskip train --train_files 'data/*.jsonl' --max_steps 1000 --output_dir runs/cpt
  hf-layerskip train --config hf_layerskip/recipes/continual_pretraining.yaml --train_files corpus.txt --learning_rate 1e-5
  hf-layerskip train --train_files notes.txt --lora_r 16 --max_steps 200 --output_dir runs/adapter
  hf-layerskip train --config hf_layerskip/recipes/continual_pretraining.yaml --train_files corpus.txt \
      --output_dir runs/cpt --resume_from_checkpoint latest
"""


@dataclass
class TrainScriptArguments:
    _argument_group_name = "model and data"

    config: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of `option: value` pairs (e.g. hf_layerskip/recipes/continual_pretraining.yaml); options "
            "given on the command line override it."
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "LayerSkip checkpoint directory to train (convert a Llama model with `hf-layerskip convert`). "
            "Unset: SmolLM2-135M-Instruct as it is (untrained for LayerSkip), fetched and converted on first use."
        },
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data files or glob patterns: .jsonl/.json (JSON lines with a text column), "
            ".parquet, or plain text (any other suffix). Required."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON and parquet files."})
    text_sample_by: str = field(
        default=DEFAULT_SAMPLE_BY,
        metadata={
            "help": "How plain-text files split into documents before packing: the whole file, paragraphs or lines.",
            "choices": list(SAMPLE_BY_CHOICES),
        },
    )
    seq_length: int = field(
        default=1024,
        metadata={
            "help": "Tokens per packed training sequence (documents joined by EOS); at most the model's "
            "max_position_embeddings."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenising and packing (default: this process only)."}
    )


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA"

    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "Train a LoRA adapter of this rank on the early-exit objective, base weights frozen, and "
            "save only the adapter. Unset: train all weights and save a full LayerSkip checkpoint."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha. Unset: 2 × lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Module names to adapt. Unset: every projection of every layer "
            f"({' '.join(DEFAULT_LORA_TARGETS)})."
        },
    )


ARGUMENT_TYPES = (TrainScriptArguments, LoraArguments, LayerSkipTrainingArguments)
TrainOptions = tuple[TrainScriptArguments, LoraArguments, LayerSkipTrainingArguments]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "train",
        ARGUMENT_TYPES,
        config_file=True,
        help="train with layer dropout and the early-exit loss (full model or LoRA adapter)",
        description=(
            "Train a LayerSkip checkpoint on text files with the LayerSkip recipe: layer dropout and the early-exit\n"
            "loss, at the model config's settings unless overridden (the LayerSkip: options). Checks every data file\n"
            "and the sequence length before loading the model, tokenises and packs the text, trains with a progress\n"
            "bar, saves checkpoints every --save_steps, resumes with --resume_from_checkpoint (a checkpoint\n"
            "directory, or 'latest' for the newest in --output_dir) and writes a LayerSkip checkpoint (or, with\n"
            "--lora_r, an adapter) to --output_dir."
        ),
        usage="hf-layerskip train [--config FILE.yaml] --train_files FILE [FILE ...] [--model DIR] [options]",
        epilog=EXAMPLES,
        formatter_class=KeepParagraphsHelpFormatter,
    )
    parser.set_defaults(run=run)


def load_config_file(path: str | Path, other_sections: tuple[str, ...] = ()) -> dict:
    """The `hf-layerskip train` options of a YAML config file, typed; see `parsing.load_config_file`."""
    return parsing.load_config_file(path, ARGUMENT_TYPES, other_sections)


def options_from(values: dict) -> TrainOptions:
    """The three argument dataclasses from typed option values (e.g. a config file's, plus a few more)."""
    return HfArgumentParser(ARGUMENT_TYPES).parse_dict(values)


def run(args: argparse.Namespace) -> int:
    return train(*dataclasses_from(args, ARGUMENT_TYPES))


def train(script: TrainScriptArguments, lora: LoraArguments, training: LayerSkipTrainingArguments) -> int:
    """Checks the data and the model, trains and saves; errors in the input stop before any training."""
    try:
        model_path, data_files = _preflight(script)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"hf-layerskip train: {error}") from None
    trainer = _build_trainer(script, lora, training, model_path, data_files)
    trainer.train(resume_from_checkpoint=_resume_target(training.resume_from_checkpoint))
    trainer.save_model(training.output_dir)
    kind = "LoRA adapter" if lora.lora_r else "LayerSkip checkpoint"
    if trainer.is_world_process_zero():
        print(f"Saved the {kind} to {training.output_dir}", flush=True)
    return 0


def _preflight(script: TrainScriptArguments) -> tuple[Path, list[Path]]:
    """Every check that needs no model weights: data files, model directory, sequence length."""
    from transformers import AutoConfig

    from ..trainer.data import check_data_files, check_sequence_length, expand_data_files

    if not script.train_files:
        raise ValueError("No training data: pass --train_files (or set train_files in the --config file).")
    data_files = expand_data_files(script.train_files)
    check_data_files(data_files, script.text_column)
    model_path = Path(script.model) if script.model else _base_checkpoint()
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"No model config at {model_path / 'config.json'}; pass a LayerSkip checkpoint directory."
        )
    config = AutoConfig.from_pretrained(model_path)
    if not hasattr(config, "early_exit_loss_scale"):
        raise ValueError(
            f"{model_path / 'config.json'}: model_type {config.model_type!r} is not a LayerSkip model; convert it "
            "first with `hf-layerskip convert SRC OUT`."
        )
    check_sequence_length(script.seq_length, config, model_path)
    return model_path, data_files


def _base_checkpoint() -> Path:
    from ..defaults import base_checkpoint

    return Path(base_checkpoint())


def _build_trainer(script, lora, training, model_path, data_files):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from ..trainer import LayerSkipTrainer
    from ..trainer.data import load_text_dataset, tokenize_and_pack

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with training.main_process_first(desc="tokenising and packing"):
        text = load_text_dataset(data_files, script.text_column, script.text_sample_by)
        dataset = tokenize_and_pack(text, tokenizer, script.seq_length, script.preprocessing_num_workers)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if lora.lora_r:
        model = _with_lora(model, lora)
    return LayerSkipTrainer(
        model, training, train_dataset=dataset, data_collator=default_data_collator, processing_class=tokenizer
    )


def _with_lora(model, lora: LoraArguments):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha if lora.lora_alpha is not None else 2 * lora.lora_r,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules or DEFAULT_LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _resume_target(value: str | None) -> str | bool | None:
    """`True` (the newest checkpoint in output_dir) for 'latest'/'true'/'auto', else the checkpoint path or None."""
    if value is None:
        return None
    return True if str(value).lower() in RESUME_LATEST else value
