"""Does the LayerSkip recipe make early exits usable? Train the same tiny byte-level model from scratch on the
standard library's Python source, for the same steps on the same data: plain (no layer dropout, last-layer loss
only) and with each LayerSkip recipe (default: hf_layerskip/recipes/pretraining_from_scratch.yaml and the model config's
defaults). Then report, on held-out files, each exit's top-1 agreement with the last layer and its loss.

    python benchmarks/recipe_effect.py --hidden-size 128 --max-steps 1000 --plot recipe_effect.png

tests/trainer/test_recipe_effect.py runs `compare` at a size CI can afford.
"""

import argparse
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM
from hf_layerskip.cli.train import load_config_file
from hf_layerskip.trainer import LayerSkipTrainer, LayerSkipTrainingArguments
from hf_layerskip.trainer.evaluation import ExitReport, exit_report
from hf_layerskip.trainer.training_args import LAYERSKIP_ARGUMENT_NAMES

VOCAB_SIZE = 256  # bytes
RECIPES = Path(__file__).resolve().parents[1] / "hf_layerskip" / "recipes"
DEFAULT_RECIPE = RECIPES / "pretraining_from_scratch.yaml"


@dataclass
class Setup:
    num_layers: int = 6
    hidden_size: int = 128
    seq_len: int = 128
    batch_size: int = 16
    max_steps: int = 1500
    learning_rate: float = 3e-3
    train_bytes: int = 4_000_000
    heldout_sequences: int = 64
    seed: int = 0


def stdlib_python_bytes(max_bytes: int) -> tuple[bytes, bytes]:
    """`(train, heldout)`: the standard library's top-level `.py` files in name order, every tenth file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, heldout = bytearray(), bytearray()
    for index, path in enumerate(files):
        (heldout if index % 10 == 9 else train).extend(path.read_bytes())
    return bytes(train[:max_bytes]), bytes(heldout)


def byte_blocks(data: bytes, seq_len: int) -> torch.LongTensor:
    """`(len(data) // seq_len, seq_len)` byte ids."""
    num_blocks = len(data) // seq_len
    return torch.frombuffer(bytearray(data[: num_blocks * seq_len]), dtype=torch.uint8).long().view(num_blocks, seq_len)


def build_model(setup: Setup) -> LayerSkipLlamaForCausalLM:
    config = LayerSkipLlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=setup.hidden_size,
        intermediate_size=4 * setup.hidden_size,
        num_hidden_layers=setup.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=setup.seq_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(setup.seed)
    return LayerSkipLlamaForCausalLM(config)


PLAIN = {"layer_dropout_max": 0.0, "early_exit_loss_scale": 0.0}  # no layer dropout, last-layer loss only


def train(setup: Setup, blocks: torch.LongTensor, layerskip_args: dict, output_dir: str) -> LayerSkipLlamaForCausalLM:
    """Trains a fresh model with `layerskip_args` (`LayerSkipTrainingArguments` fields; `{}`: the config's recipe)."""
    args = LayerSkipTrainingArguments(
        output_dir=output_dir,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_steps=max(setup.max_steps // 10, 1),
        disable_tqdm=False,
        max_steps=setup.max_steps,
        per_device_train_batch_size=setup.batch_size,
        learning_rate=setup.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, setup.max_steps // 10),
        weight_decay=0.1,
        seed=setup.seed,
        **layerskip_args,
    )
    model = build_model(setup)
    dataset = [{"input_ids": row, "labels": row} for row in blocks]
    LayerSkipTrainer(model, args, train_dataset=dataset).train()
    return model.eval()


def recipe_arguments(path: str | Path) -> dict:
    """The LayerSkip settings of a recipe file (its optimisation settings are `Setup`'s business here)."""
    return {name: value for name, value in load_config_file(path).items() if name in LAYERSKIP_ARGUMENT_NAMES}


def compare(setup: Setup, variants: dict[str, dict]) -> dict[str, ExitReport]:
    """Per-exit figures on held-out bytes after training the same setup plain and with each of `variants`
    (name -> LayerSkip arguments); the result's first entry is `"plain"`."""
    train_data, heldout_data = stdlib_python_bytes(setup.train_bytes)
    blocks = byte_blocks(train_data, setup.seq_len)
    heldout = byte_blocks(heldout_data, setup.seq_len)[: setup.heldout_sequences]
    reports = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, run_args) in enumerate({"plain": PLAIN, **variants}.items()):
            model = train(setup, blocks, run_args, str(Path(scratch) / str(index)))
            reports[name] = exit_report(model, heldout)
    return reports


def mean_early_agreement(report: ExitReport) -> float:
    """Mean top-1 agreement with the last layer over the early exits."""
    return sum(report.agreement[:-1]) / (len(report.agreement) - 1)


def print_table(setup: Setup, reports: dict[str, ExitReport]) -> None:
    print(f"setup: {asdict(setup)}")
    names = list(reports)
    print("| exit after layer | " + " | ".join(f"agreement {name}" for name in names) + " | "
          + " | ".join(f"loss {name}" for name in names) + " |")  # fmt: skip
    print("|---" * (2 * len(names) + 1) + "|")
    for layer in range(setup.num_layers):
        agreements = " | ".join(f"{reports[name].agreement[layer]:.3f}" for name in names)
        losses = " | ".join(f"{reports[name].loss[layer]:.3f}" for name in names)
        print(f"| {layer + 1} | {agreements} | {losses} |")
    plain = reports["plain"]
    for name in names:
        report = reports[name]
        print(
            f"{name}: mean early-exit agreement {mean_early_agreement(report):.3f}, "
            f"last-layer loss {report.loss[-1]:.3f} ({report.loss[-1] / plain.loss[-1]:.3f} × plain)"
        )


def plot(setup: Setup, reports: dict[str, ExitReport], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exits = range(1, setup.num_layers + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, report in reports.items():
        left.plot(exits, report.agreement, marker="o", label=name)
        right.plot(exits, report.loss, marker="o", label=name)
    left.set(xlabel="exit after layer", ylabel="top-1 agreement with last layer", ylim=(0, 1.05))
    right.set(xlabel="exit after layer", ylabel="held-out loss (nats/byte)")
    for axes in (left, right):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(f"{setup.num_layers} layers, hidden {setup.hidden_size}, {setup.max_steps} steps")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Setup()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument(
        "--recipe",
        action="append",
        help=f"a recipe YAML file whose LayerSkip settings to compare (repeatable; default: {DEFAULT_RECIPE.name} "
        "and the model config's defaults)",
    )
    parser.add_argument("--plot", help="write the per-exit figures to this PNG file")
    options = vars(parser.parse_args(argv))
    plot_path, recipes = options.pop("plot"), options.pop("recipe")
    setup = Setup(**options)
    if recipes:
        variants = {Path(recipe).stem: recipe_arguments(recipe) for recipe in recipes}
    else:
        variants = {DEFAULT_RECIPE.stem: recipe_arguments(DEFAULT_RECIPE), "config_defaults": {}}
    reports = compare(setup, variants)
    print_table(setup, reports)
    if plot_path:
        plot(setup, reports, plot_path)


if __name__ == "__main__":
    main()
