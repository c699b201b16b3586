"""`hf-layerskip train`: continual pretraining or fine-tuning with the LayerSkip recipe, or a LoRA adapter.

Options are the fields of `TrainScriptArguments`, `LoraArguments` and `LayerSkipTrainingArguments` (so every
`transformers.TrainingArguments` option too), each as `--name` or `--name-with-dashes`. `--config FILE.yaml` gives
options as `name: value` pairs; options on the command line override it.
"""

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..trainer.data import DEFAULT_SAMPLE_BY, SAMPLE_BY_CHOICES
from ..trainer.training_args import LAYERSKIP_ARGUMENT_NAMES, LayerSkipTrainingArguments

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESUME_LATEST = ("true", "latest", "auto")

EXAMPLES = """examples:
  hf-layerskip train --train_files 'data/*.jsonl' --max_steps 1000 --output_dir runs/cpt
  hf-layerskip train --config recipes/continual_pretraining.yaml --train_files corpus.txt --learning_rate 1e-5
  hf-layerskip train --train_files notes.txt --lora_r 16 --max_steps 200 --output_dir runs/adapter
  hf-layerskip train --config recipes/continual_pretraining.yaml --train_files corpus.txt \
      --output_dir runs/cpt --resume_from_checkpoint latest
"""


@dataclass
class TrainScriptArguments:
    _argument_group_name = "model and data"

    config: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of `option: value` pairs (e.g. recipes/continual_pretraining.yaml); options "
            "given on the command line override it."
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "LayerSkip checkpoint directory to train (convert a Llama model with `hf-layerskip convert`). "
            "Default: SmolLM2-135M-Instruct as it is (untrained for LayerSkip), fetched and converted on first use."
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
            "save only the adapter. Default: train all weights and save a full LayerSkip checkpoint."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha. Default: 2 × lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Module names to adapt. Default: every projection of every layer "
            f"({' '.join(DEFAULT_LORA_TARGETS)})."
        },
    )


ARGUMENT_TYPES = (TrainScriptArguments, LoraArguments, LayerSkipTrainingArguments)


def _options_parser(**kwargs) -> HfArgumentParser:
    """The options as an `HfArgumentParser` whose defaults are suppressed, so a parse returns only what was given.

    Help groups: model and data, LoRA, LayerSkip, then the remaining `TrainingArguments`.
    """
    parser = HfArgumentParser(ARGUMENT_TYPES, **kwargs)
    _regroup(
        parser, "LayerSkip (each defaults to the model config's value: the paper's recipe)", LAYERSKIP_ARGUMENT_NAMES
    )
    _regroup(parser, "training (transformers.TrainingArguments)", {f.name for f in fields(LayerSkipTrainingArguments)})
    for action in parser._actions:
        if action.dest == "help":
            continue
        if action.default is not None and action.default is not argparse.SUPPRESS and action.option_strings:
            if not action.option_strings[0].startswith("--no_"):
                shown = str(getattr(action.default, "value", action.default)).replace("%", "%%")
                action.help = f"{action.help or ''} (default: {shown})".strip()
        action.default = argparse.SUPPRESS
    return parser


def _regroup(parser: argparse.ArgumentParser, title: str, names) -> None:
    """Moves the options of the general group whose destination is in `names` into a new help group `title`."""
    general = parser._optionals
    group = parser.add_argument_group(title)
    for action in [action for action in general._group_actions if action.dest in names]:
        general._group_actions.remove(action)
        group._group_actions.append(action)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        parents=[_options_parser(add_help=False)],
        help="train with layer dropout and the early-exit loss (full model or LoRA adapter)",
        description=(
            "Train a LayerSkip checkpoint on text files with the LayerSkip recipe: layer dropout and the early-exit "
            "loss, at the model config's settings unless overridden (LayerSkip options below). Checks every data "
            "file and the sequence length before loading the model, tokenises and packs the text, trains with a "
            "progress bar, saves checkpoints every --save_steps, resumes with --resume_from_checkpoint (a "
            "checkpoint directory, or 'latest' for the newest in --output_dir) and writes a LayerSkip checkpoint "
            "(or, with --lora_r, an adapter) to --output_dir."
        ),
        usage="hf-layerskip train [--config FILE.yaml] --train_files FILE [FILE ...] [--model DIR] [options]",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)


def load_config_file(path: str | Path, other_sections: tuple[str, ...] = ()) -> dict:
    """The options of a YAML config file, typed as the command line would type them; top-level keys in
    `other_sections` belong to another command and are skipped.

    Raises `ValueError` naming the file and line for a malformed file, an unknown option or a bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        document = yaml.compose(text)
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: malformed YAML: {getattr(error, 'problem', error)}.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of `option: value` pairs, got {type(values).__name__}.")
    lines = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in document.value}

    parser = _options_parser(exit_on_error=False)
    known = {action.dest for action in parser._actions}
    options = {}
    for name, value in values.items():
        if name in other_sections:
            continue
        where = f"{path}:{lines.get(name, '?')}"
        if name not in known or name == "config":
            raise ValueError(f"{where}: unknown option {name!r} (see `hf-layerskip train --help`).")
        if value is None:
            continue
        try:
            parsed = vars(parser.parse_args([f"--{name}", *_command_line_tokens(value)]))
        except (argparse.ArgumentError, SystemExit) as error:
            raise ValueError(f"{where}: bad value {value!r} for {name!r}: {error}") from None
        options[name] = parsed[name]
    return options


def _command_line_tokens(value) -> list[str]:
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, list):
        return [str(item) for item in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def parse_options(given: dict) -> tuple[TrainScriptArguments, LoraArguments, LayerSkipTrainingArguments]:
    """The three argument dataclasses from the options `given` on the command line over those of `--config`."""
    given = {name: value for name, value in given.items() if name not in ("command", "run")}
    from_file = load_config_file(given["config"]) if given.get("config") else {}
    return HfArgumentParser(ARGUMENT_TYPES).parse_dict({**from_file, **given})


def run(args: argparse.Namespace) -> int:
    try:
        script, lora, training = parse_options(vars(args))
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
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("hf-layerskip train: --lora_r needs peft: pip install 'hf_layerskip[peft]'") from None
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
