"""`hf-layerskip sweep`: self-speculative speedup over a grid of exit layers E and draft lengths d (resumable)."""

import argparse
from dataclasses import dataclass, field

import torch

from .measure_options import (
    FloatList,
    GenerationArguments,
    IntList,
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    check_exit_layers,
    load_encoded_prompts,
    load_model,
)
from .parsing import add_dataclass_command, dataclasses_from


@dataclass
class SweepArguments:
    _argument_group_name = "sweep"

    exit_layers: IntList | None = field(
        default=None,
        metadata={
            "help": "Exit layers E, e.g. 4,8,12 or 4-24:4 (inclusive; unset: about 6 evenly spaced layers in "
            "[1, L-1]).",
            "metavar": "LIST",
        },
    )
    num_speculations: IntList = field(
        default=IntList((1, 2, 3, 4, 6)), metadata={"help": "Draft lengths d, e.g. 1,2,4 or 1-6.", "metavar": "LIST"}
    )
    confidence_thresholds: FloatList = field(
        default=FloatList((0.0,)),
        metadata={
            "help": "Confidence thresholds t, e.g. 0,0.5,0.7: a draft stops after a token the exit gives probability "
            "< t (0: a constant draft length).",
            "metavar": "LIST",
        },
    )
    draft_vocab_sizes: IntList = field(
        default=IntList((0,)),
        metadata={
            "help": "Draft vocabulary sizes K, e.g. 2048,4096,8192: the draft scores the model's K most frequent ids "
            "(a prefix of its draft vocabulary); 0 means all of it.",
            "metavar": "LIST",
        },
    )
    lookup_tokens: IntList = field(
        default=IntList((0,)),
        metadata={
            "help": "Lookup lengths, e.g. 0,4,8: a round whose last tokens occurred earlier in the sequence drafts up "
            "to this many of the tokens that followed them, instead of drafting with the exit (0: never).",
            "metavar": "LIST",
        },
    )
    output_dir: str = field(
        default="sweep",
        metadata={
            "help": "Folder for the CSVs, settings and heatmap; rerun with the same one to resume.",
            "metavar": "DIR",
        },
    )
    max_cells: int | None = field(
        default=None,
        metadata={
            "help": "Stop after K newly measured cells; rerun the command for the rest (unset: no limit).",
            "metavar": "K",
        },
    )
    paired: bool = field(
        default=False,
        metadata={
            "help": "Time plain decoding again inside every cell, alternating with the cell's runs prompt by prompt, "
            "and take each cell's speedup from its own plain runs: robust to machine drift, at twice the cost (unset: "
            "one cached plain baseline for all cells)."
        },
    )
    no_warmup: bool = field(
        default=False,
        metadata={"help": "Skip the unmeasured warm-up runs (one plain and one self-speculative call)."},
    )


ARGUMENT_TYPES = [ModelArguments, ProgressArguments, PromptArguments, GenerationArguments, SweepArguments]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "sweep",
        ARGUMENT_TYPES,
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
    parser.set_defaults(run=run, num_prompts=5, max_new_tokens=32)


def default_exit_layers(num_layers: int, count: int = 6) -> list[int]:
    """About `count` evenly spaced exit layers in [1, num_layers - 1]."""
    step = max((num_layers - 1) // count, 1)
    return list(range(step, num_layers, step))[:count]


def run(args: argparse.Namespace) -> int:
    from ..generation.plots import plot_speedup_heatmap
    from ..generation.sweep import run_sweep, speedup_grid, sweep_grid

    model_options, progress, prompt_options, generation, options = dataclasses_from(args, ARGUMENT_TYPES)
    model, tokenizer = load_model(model_options.model, model_options.dtype, model_options.device, "sweep")
    exit_layers = options.exit_layers or default_exit_layers(model.config.num_hidden_layers)
    check_exit_layers(exit_layers, model, "sweep")
    if min(options.num_speculations) < 1:
        raise SystemExit(f"hf-layerskip sweep: draft lengths must be at least 1, got {options.num_speculations}.")
    available = len(model.draft_head.vocab_ids) if model.draft_head.vocab_ids is not None else 0
    if any(not 0 <= k <= available for k in options.draft_vocab_sizes):
        raise SystemExit(
            f"hf-layerskip sweep: draft vocabulary sizes must be in [0, {available}] (the model's draft vocabulary; "
            f"0 means all of it), got {options.draft_vocab_sizes}."
        )
    if any(not 0 <= t <= 1 for t in options.confidence_thresholds):
        raise SystemExit(
            f"hf-layerskip sweep: confidence thresholds must be in [0, 1], got {options.confidence_thresholds}."
        )
    prompts, encoded = load_encoded_prompts(prompt_options, tokenizer, model.device)
    settings = {
        "model": str(model_options.model or "default"),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "prompt_source": prompt_options.prompts,
        "prompts_file": prompt_options.prompts_file,
        "prompt_ids": [p.id for p in prompts],
        "chat_template": prompt_options.chat_template,
        "max_new_tokens": generation.max_new_tokens,
        "paired": options.paired,
    }
    grid = sweep_grid(
        exit_layers,
        options.num_speculations,
        options.confidence_thresholds,
        options.draft_vocab_sizes,
        options.lookup_tokens,
    )
    result = run_sweep(
        model,
        [p.id for p in prompts],
        encoded,
        grid,
        generation.max_new_tokens,
        options.output_dir,
        settings,
        max_cells=options.max_cells,
        paired=options.paired,
        warmup=not options.no_warmup,
        progress=not progress.no_progress,
    )
    best = result.best
    plot_speedup_heatmap(
        speedup_grid(result.cells, exit_layers, options.num_speculations),
        exit_layers,
        options.num_speculations,
        result.files.heatmap,
        best=(best.exit_layer, best.num_speculations) if best else None,
        title="Self-speculative speedup over plain greedy decoding"
        + (" (best t, K, lookup per cell)" if len(grid) > len(exit_layers) * len(options.num_speculations) else ""),
    )
    skipped = len(grid) - len(result.measured_now) - len(result.pending)
    print(f"measured {len(result.measured_now)} cells now, {skipped} were already done, {len(result.pending)} pending")
    print(f"wrote {result.files.cells}, {result.files.plain} and {result.files.heatmap}")
    if best is not None:
        print(
            f"best exact cell: {best.strategy.name}: speedup {best.speedup:.2f}x, "
            f"acceptance {best.acceptance_rate:.3f}, {best.tokens_per_round:.2f} tokens/round"
        )
    else:
        print("no finished cell matched plain greedy decoding exactly")
    return 0
