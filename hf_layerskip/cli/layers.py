"""`hf-layerskip layers`: early-exit perplexity and top-1 agreement with the last layer, for every layer."""

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path

from .measure_options import ModelArguments, ProgressArguments, load_model
from .parsing import add_dataclass_command, dataclasses_from


@dataclass
class LayersArguments:
    _argument_group_name = "layers"

    compare: str | None = field(
        default=None,
        metadata={
            "help": "A second checkpoint to overlay, e.g. the same model after LayerSkip training (unset: none).",
            "metavar": "OTHER_MODEL",
        },
    )
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "Legend labels: one for --model, then one for --compare (unset: the folder names).",
            "metavar": "LABEL",
        },
    )
    text: str = field(
        default="humaneval",
        metadata={
            "help": "humaneval (each prompt followed by its canonical solution), stdlib (standard-library Python "
            "modules), a .jsonl file (see --text-field) or any text file.",
            "metavar": "SOURCE",
        },
    )
    text_field: str = field(default="text", metadata={"help": "Field of a .jsonl text source."})
    num_texts: int = field(default=40, metadata={"help": "Use at most N texts.", "metavar": "N"})
    first_text: int = field(
        default=0,
        metadata={"help": "Skip the first K texts, e.g. 124 for the HumanEval problems 124..163.", "metavar": "K"},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens kept per text.", "metavar": "T"})
    max_tokens: int = field(
        default=8192, metadata={"help": "Stop gathering texts after T tokens in all.", "metavar": "T"}
    )
    csv: str = field(default="layers.csv", metadata={"help": "CSV output.", "metavar": "PATH"})
    plot: str = field(default="layers.png", metadata={"help": "PNG output.", "metavar": "PATH"})


ARGUMENT_TYPES = [ModelArguments, ProgressArguments, LayersArguments]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "layers",
        ARGUMENT_TYPES,
        help="per-layer early-exit perplexity and top-1 agreement with the last layer (CSV and plot)",
        description=(
            "Exit after each layer in turn (the model's own final norm and LM head on that layer's output) and "
            "score the exit on a text set: perplexity of the next token, and top-1 agreement, the fraction of "
            "positions where its argmax equals the last layer's. Writes a CSV (one row per model and layer) and a "
            "PNG with both curves. With --compare, a second checkpoint (e.g. before and after LayerSkip training) "
            "is scored on the same texts and drawn on the same plot."
        ),
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..generation.data import load_texts
    from ..generation.layer_quality import layer_quality, tokenize_texts
    from ..generation.plots import plot_layer_quality

    model_options, progress, options = dataclasses_from(args, ARGUMENT_TYPES)
    checkpoints = [model_options.model] + ([options.compare] if options.compare else [])
    labels = options.labels or [Path(str(c)).name if c else "SmolLM2-135M-Instruct" for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise SystemExit(f"hf-layerskip layers: --labels needs {len(checkpoints)} labels, got {len(labels)}: {labels}.")
    texts = load_texts(options.text, options.num_texts, options.text_field, options.first_text)
    if not texts:
        raise SystemExit(f"hf-layerskip layers: no texts left after skipping --first-text {options.first_text}.")

    curves = {}
    for label, checkpoint in zip(labels, checkpoints):
        model, tokenizer = load_model(checkpoint, model_options.dtype, model_options.device, "layers")
        sequences = tokenize_texts(tokenizer, texts, options.max_length, options.max_tokens)
        curves[label] = layer_quality(model, sequences, progress=not progress.no_progress)

    for path in (options.csv, options.plot):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows = [{"model": label, **row.to_dict()} for label, quality in curves.items() for row in quality]
    columns = list(dict.fromkeys(name for row in rows for name in row))  # the last layer has no draft columns
    with open(options.csv, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot_layer_quality(curves, options.plot, title=f"Early-exit quality per layer ({options.text} text)")

    for label, quality in curves.items():
        print(f"{label}: {quality[0].tokens} predicted tokens; draft = through the draft head (exit adapter, draft "
              "vocabulary) where the model has one; confident@t = share of positions where the draft's top "
              "probability >= t, right = how often it agrees there")
        thresholds = quality[0].draft.thresholds if quality[0].draft is not None else ()
        header = ["layer", "perplexity", "top-1 agreement", "draft top-1"]
        header += [f"{name}@{t:g}" for t in thresholds for name in ("confident", "right")]
        print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
        for row in quality:
            cells = [str(row.layer), f"{row.perplexity:.2f}", f"{row.top1_agreement:.3f}"]
            if row.draft is not None:
                cells.append(f"{row.draft.top1_agreement:.3f}")
                for t in thresholds:
                    cells += [f"{row.draft.confident_share(t):.3f}", f"{row.draft.right_when_confident(t):.3f}"]
            print("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")
    print(f"wrote {options.csv} and {options.plot}")
    return 0
