"""`hf-layerskip sweep`: self-speculative speedup over a grid of exit layers E and draft lengths d (resumable)."""

import argparse

import torch

from .measure_options import (
    add_generation_arguments,
    add_model_arguments,
    add_prompt_arguments,
    check_exit_layers,
    load_encoded_prompts,
    load_model,
    parse_int_list,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="self-speculative speedup over a grid of exit layers E x draft lengths d (resumable)",
        description=(
            "For every (E, d) of the grid, greedy-decode the prompts self-speculatively and compare with plain "
            "greedy decoding of the same prompts, timed in the same output folder. Writes OUTPUT_DIR/sweep.csv (one "
            "row per cell: tokens/s, ms/token, speedup = plain ms/token over the cell's, acceptance rate, tokens per "
            "round, mismatches against plain), OUTPUT_DIR/plain.csv (the plain baseline per prompt, timed once and "
            "cached), OUTPUT_DIR/settings.json and a heatmap OUTPUT_DIR/speedup_heatmap.png, and names the fastest "
            "exact pair. Each cell's row is appended as soon as it finishes, so rerunning the same command after an "
            "interruption measures only the missing cells (the grid may grow between runs; the other settings must "
            "stay the same). By default all cells share the one plain baseline, so their ranking does not depend on "
            "it, but their speedups move with any drift of the machine since it was timed; --paired re-times plain "
            "inside every cell instead. `hf-layerskip benchmark` confirms a pair with runs interleaved per prompt."
        ),
    )
    add_model_arguments(parser)
    add_prompt_arguments(parser, default_count=5)
    add_generation_arguments(parser, default_new_tokens=32)
    parser.add_argument(
        "--exit-layers",
        type=parse_int_list,
        default=None,
        metavar="LIST",
        help="exit layers E, e.g. 4,8,12 or 4-24:4 (inclusive; default: about 6 evenly spaced layers in [1, L-1])",
    )
    parser.add_argument(
        "--num-speculations",
        type=parse_int_list,
        default=[1, 2, 3, 4, 6],
        metavar="LIST",
        help="draft lengths d, e.g. 1,2,4 or 1-6 (default 1,2,3,4,6)",
    )
    parser.add_argument(
        "--output-dir",
        default="sweep",
        metavar="DIR",
        help="folder for the CSVs, settings and heatmap; rerun with the same one to resume (default ./sweep)",
    )
    parser.add_argument(
        "--max-cells",
        type=int,
        default=None,
        metavar="K",
        help="stop after K newly measured cells; rerun the command for the rest (default: no limit)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="time plain decoding again inside every cell, alternating with the cell's runs prompt by prompt, and "
        "take each cell's speedup from its own plain runs: robust to machine drift, at twice the cost (default: one "
        "cached plain baseline for all cells)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the unmeasured warm-up runs (one plain and one self-speculative call)",
    )
    parser.set_defaults(run=run)


def default_exit_layers(num_layers: int, count: int = 6) -> list[int]:
    """About `count` evenly spaced exit layers in [1, num_layers - 1]."""
    step = max((num_layers - 1) // count, 1)
    return list(range(step, num_layers, step))[:count]


def run(args: argparse.Namespace) -> int:
    from ..generation.plots import plot_speedup_heatmap
    from ..generation.sweep import run_sweep, speedup_grid

    model, tokenizer = load_model(args.model, args.dtype, args.device, "sweep")
    exit_layers = args.exit_layers or default_exit_layers(model.config.num_hidden_layers)
    check_exit_layers(exit_layers, model, "sweep")
    if min(args.num_speculations) < 1:
        raise SystemExit(f"hf-layerskip sweep: draft lengths must be at least 1, got {args.num_speculations}.")
    prompts, encoded = load_encoded_prompts(args, tokenizer, model.device)
    settings = {
        "model": str(args.model or "default"),
        "dtype": args.dtype,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "prompt_source": args.prompts,
        "prompts_file": args.prompts_file,
        "prompt_ids": [p.id for p in prompts],
        "chat_template": args.chat_template,
        "max_new_tokens": args.max_new_tokens,
        "paired": args.paired,
    }
    result = run_sweep(
        model,
        [p.id for p in prompts],
        encoded,
        exit_layers,
        args.num_speculations,
        args.max_new_tokens,
        args.output_dir,
        settings,
        max_cells=args.max_cells,
        paired=args.paired,
        warmup=not args.no_warmup,
        progress=not args.no_progress,
    )
    best = result.best
    plot_speedup_heatmap(
        speedup_grid(result.cells, exit_layers, args.num_speculations),
        exit_layers,
        args.num_speculations,
        result.files.heatmap,
        best=(best.exit_layer, best.num_speculations) if best else None,
    )
    skipped = len(exit_layers) * len(args.num_speculations) - len(result.measured_now) - len(result.pending)
    print(f"measured {len(result.measured_now)} cells now, {skipped} were already done, {len(result.pending)} pending")
    print(f"wrote {result.files.cells}, {result.files.plain} and {result.files.heatmap}")
    if best is not None:
        print(
            f"best exact pair: E={best.exit_layer}, d={best.num_speculations}: speedup {best.speedup:.2f}x, "
            f"acceptance {best.acceptance_rate:.3f}, {best.tokens_per_round:.2f} tokens/round"
        )
    else:
        print("no finished cell matched plain greedy decoding exactly")
    return 0
