"""`hf-layerskip train-lora`: the LayerSkip recipe on SmolLM2 as a LoRA adapter, from the base GGUF, offline,
resumably.

The previous default model was this adapter merged into SmolLM2; the draft head (`train-draft`, `train-default`)
replaced it, being faster with the model's weights unchanged (recipes/MODEL_CARD.md has both sets of figures).

Three stages, each skipped when its output is already in --work-dir: self-distillation data (the base model's
greedy continuations of standard-library coding prompts), LoRA training with `hf-layerskip train` and the recipe,
and the adapter's export (bf16 safetensors plus `layerskip_settings.json`).
"""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..defaults import RECIPES_DIR
from .parsing import KeepParagraphsHelpFormatter, add_dataclass_command, dataclasses_from

DEFAULT_RECIPE = RECIPES_DIR / "smollm2_self_speculative.yaml"
DISTILLATION_SECTION = "self_distillation"
DISTILLATION_DEFAULTS = dict(num_prompts=512, max_new_tokens=128, batch_size=16, seed=0)


@dataclass
class TrainLoraArguments:
    recipe: str = field(
        default=str(DEFAULT_RECIPE),
        metadata={"help": "YAML recipe: `hf-layerskip train` options plus a self_distillation section."},
    )
    work_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the data, training checkpoints and adapter go; rerun with the same directory to resume "
            "(unset: the cache directory's train-lora/)."
        },
    )
    adapter_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where to export the adapter (unset: WORK_DIR/adapter)."
        },
    )
    exit_layer: int | None = field(
        default=None, metadata={"help": "Exit layer E to record with the adapter (unset: none)."}
    )
    num_speculations: int | None = field(
        default=None, metadata={"help": "Draft length d to record with the adapter (unset: none)."}
    )


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "train-lora",
        [TrainLoraArguments],
        help="train the LayerSkip recipe on SmolLM2 as a LoRA adapter, from the base GGUF (resumes where it stopped)",
        description=__doc__,
        formatter_class=KeepParagraphsHelpFormatter,
    )
    parser.set_defaults(run=run)


def load_recipe(path: str | Path) -> tuple[dict, dict]:
    """`(distillation settings, train options)` of a recipe; errors name the file."""
    from .train import load_config_file

    path = Path(path)
    values = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a YAML mapping of `hf-layerskip train` options (file missing or empty).")
    distillation = values.get(DISTILLATION_SECTION) or {}
    unknown = sorted(set(distillation) - set(DISTILLATION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{path}: unknown {DISTILLATION_SECTION} settings {unknown}; allowed: {', '.join(DISTILLATION_DEFAULTS)}."
        )
    return {**DISTILLATION_DEFAULTS, **distillation}, load_config_file(path, other_sections=(DISTILLATION_SECTION,))


def run(args: argparse.Namespace) -> int:
    (options,) = dataclasses_from(args, [TrainLoraArguments])
    return train_lora(options)


def train_lora(options: TrainLoraArguments) -> int:
    from ..defaults import base_checkpoint, cache_dir

    try:
        distillation, train_options = load_recipe(options.recipe)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"hf-layerskip train-lora: {error}") from None
    work_dir = Path(options.work_dir) if options.work_dir else cache_dir() / "train-lora"
    base = base_checkpoint()
    data_files = distill(base, work_dir / "data", distillation)
    run_dir = work_dir / "run"
    train(base, data_files, run_dir, train_options)
    adapter_dir = Path(options.adapter_dir) if options.adapter_dir else work_dir / "adapter"
    settings = {"exit_layer": options.exit_layer, "num_speculations": options.num_speculations}
    export_adapter(run_dir, adapter_dir, {k: v for k, v in settings.items() if v is not None})
    print(adapter_dir, flush=True)
    return 0


def distill(base: Path, data_dir: Path, settings: dict) -> list[Path]:
    import torch
    from transformers import AutoTokenizer

    from ..generation.builtin import plain_llama_view
    from ..modeling import LayerSkipLlamaForCausalLM
    from ..trainer.self_distillation import shard_paths, stdlib_function_prompts, write_self_distillation_data

    done = shard_paths(data_dir, settings["num_prompts"])
    if all(shard.is_file() for shard in done):  # nothing to generate: skip loading the model
        return done
    prompts = stdlib_function_prompts(seed=settings["seed"])[: settings["num_prompts"]]
    model = plain_llama_view(LayerSkipLlamaForCausalLM.from_pretrained(base, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(base)
    return write_self_distillation_data(
        model, tokenizer, prompts, data_dir, settings["max_new_tokens"], batch_size=settings["batch_size"]
    )


def train(base: Path, data_files: list[Path], run_dir: Path, train_options: dict) -> None:
    from . import train as train_command

    if (run_dir / "adapter_model.safetensors").is_file():
        return
    options = dict(train_options, model=str(base), train_files=[str(f) for f in data_files], output_dir=str(run_dir))
    if any(run_dir.glob("checkpoint-*")):
        options["resume_from_checkpoint"] = "latest"
    train_command.train(*train_command.options_from(options))


def export_adapter(run_dir: Path, adapter_dir: Path, settings: dict) -> None:
    """The trained adapter in bf16 (half the bytes of fp32; its published figures are measured with the bf16 factors)
    and the LayerSkip settings to apply when it is merged."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..defaults import SETTINGS_FILE_NAME

    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(run_dir / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_config.json").write_text((run_dir / "adapter_config.json").read_text())
    (adapter_dir / SETTINGS_FILE_NAME).write_text(json.dumps(settings, indent=2) + "\n")
