"""`hf-layerskip layers`: early-exit perplexity and top-1 agreement with the last layer, for every layer."""

import argparse
import csv
from pathlib import Path

from .measure_options import add_model_arguments, load_model


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "layers",
        help="per-layer early-exit perplexity and top-1 agreement with the last layer (CSV and plot)",
        description=(
            "Exit after each layer in turn (the model's own final norm and LM head on that layer's output) and "
            "score the exit on a text set: perplexity of the next token, and top-1 agreement, the fraction of "
            "positions where its argmax equals the last layer's. Writes a CSV (one row per model and layer) and a "
            "PNG with both curves. With --compare, a second checkpoint (e.g. before and after LayerSkip training) "
            "is scored on the same texts and drawn on the same plot."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--compare",
        default=None,
        metavar="OTHER_MODEL",
        help="a second checkpoint to overlay, e.g. the same model after LayerSkip training (default: none)",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="legend labels: one for --model, then one for --compare (default: the folder names)",
    )
    parser.add_argument(
        "--text",
        default="humaneval",
        metavar="SOURCE",
        help="humaneval (each prompt followed by its canonical solution), stdlib (standard-library Python "
        "modules), a .jsonl file (see --text-field) or any text file (default humaneval)",
    )
    parser.add_argument("--text-field", default="text", help="field of a .jsonl text source (default text)")
    parser.add_argument(
        "--num-texts", type=int, default=40, metavar="N", help="use at most N texts (default 40)"
    )
    parser.add_argument(
        "--first-text",
        type=int,
        default=0,
        metavar="K",
        help="skip the first K texts, e.g. 124 for the HumanEval problems 124..163 (default 0)",
    )
    parser.add_argument("--max-length", type=int, default=512, metavar="T", help="tokens kept per text (default 512)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        metavar="T",
        help="stop gathering texts after T tokens in all (default 8192)",
    )
    parser.add_argument("--csv", default="layers.csv", metavar="PATH", help="CSV output (default layers.csv)")
    parser.add_argument("--plot", default="layers.png", metavar="PATH", help="PNG output (default layers.png)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..generation.data import load_texts
    from ..generation.layer_quality import layer_quality, tokenize_texts
    from ..generation.plots import plot_layer_quality

    checkpoints = [args.model] + ([args.compare] if args.compare else [])
    labels = args.labels or [Path(str(c)).name if c else "SmolLM2-135M-Instruct" for c in checkpoints]
    if len(labels) != len(checkpoints):
        raise SystemExit(f"hf-layerskip layers: --labels needs {len(checkpoints)} labels, got {len(labels)}: {labels}.")
    texts = load_texts(args.text, args.num_texts, args.text_field, args.first_text)
    if not texts:
        raise SystemExit(f"hf-layerskip layers: no texts left after skipping --first-text {args.first_text}.")

    curves = {}
    for label, checkpoint in zip(labels, checkpoints):
        model, tokenizer = load_model(checkpoint, args.dtype, args.device, "layers")
        sequences = tokenize_texts(tokenizer, texts, args.max_length, args.max_tokens)
        curves[label] = layer_quality(model, sequences, progress=not args.no_progress)

    for path in (args.csv, args.plot):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["model", "layer", "perplexity", "top1_agreement", "tokens"])
        writer.writeheader()
        for label, rows in curves.items():
            writer.writerows({"model": label, **row.to_dict()} for row in rows)
    plot_layer_quality(curves, args.plot, title=f"Early-exit quality per layer ({args.text} text)")

    for label, rows in curves.items():
        print(f"{label}: {rows[0].tokens} predicted tokens")
        print("| layer | perplexity | top-1 agreement |\n|---|---|---|")
        for row in rows:
            print(f"| {row.layer} | {row.perplexity:.2f} | {row.top1_agreement:.3f} |")
    print(f"wrote {args.csv} and {args.plot}")
    return 0
