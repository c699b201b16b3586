"""`hf-layerskip throughput`: batched tokens/s of plain and self-speculative greedy decoding against batch size."""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from .measure_options import (
    GenerationArguments,
    IntList,
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    SpeculationArguments,
    load_encoded_prompts,
    load_model,
    write_json,
)
from .parsing import add_dataclass_command, dataclasses_from

STRATEGY_HELP = {
    "plain": "one batched greedy generate call per group of B left-padded prompts (the baseline)",
    "self_speculative": "the same batched call, self-speculative at (E, d, t)",
    "self_speculative_loop": "one batch-1 self-speculative call per prompt of the group, in a Python loop",
}


@dataclass
class ThroughputArguments:
    _argument_group_name = "throughput"

    batch_sizes: IntList = field(
        default=IntList((1, 2, 4, 8)),
        metadata={"help": "Batch sizes B, e.g. 1,2,4,8 or 1-8.", "metavar": "LIST"},
    )
    warmup: int = field(
        default=1,
        metadata={"help": "Unmeasured groups of every strategy at the smallest batch size.", "metavar": "N"},
    )
    repeats: int = field(
        default=3,
        metadata={
            "help": "Runs of each group with every strategy, in turn; the run of median seconds counts.",
            "metavar": "N",
        },
    )
    output: str = field(default="throughput.json", metadata={"help": "JSON file for all figures.", "metavar": "PATH"})
    markdown: str | None = field(
        default=None,
        metadata={"help": "Also write the printed table to this file (unset: only print it).", "metavar": "PATH"},
    )
    plot: str | None = field(
        default=None,
        metadata={
            "help": "PNG plot of tokens/s against B, one line per strategy (unset: the JSON path with .png).",
            "metavar": "PATH",
        },
    )


ARGUMENT_TYPES = [
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    GenerationArguments,
    SpeculationArguments,
    ThroughputArguments,
]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "throughput",
        ARGUMENT_TYPES,
        help="batched tokens/s of plain and self-speculative greedy decoding against batch size",
        description=(
            "For each batch size B, split the prompts into consecutive groups of B (the last may be smaller) and "
            "greedy-decode every group with each strategy: "
            + "; ".join(f"{name}: {text}" for name, text in STRATEGY_HELP.items())
            + ". So that machine drift cancels, runs are interleaved per group (the strategy order rotates from group "
            "to group) and all batch sizes move through the prompts together (groups run in the order of their first "
            "prompt); warm-up groups are excluded, and each group runs --repeats times, its median run counting. "
            "Metrics per (B, strategy): new tokens/s (a row's new tokens up to and including its first EOS, summed "
            "over the groups, over the summed wall seconds of the groups' calls), speedup against plain at the same B "
            "and against plain at B=1 (when 1 is among the batch sizes), acceptance rate (accepted / drafted over all "
            "rows), peak memory (absolute, weights included; the largest over the groups, measured as `benchmark` "
            "does) and how many rows differ from plain batched greedy decoding at the same B (0 expected in float32; "
            "in half precision rows may part at numerical near-ties). Prints a markdown table and writes a JSON file "
            "and a PNG plot."
        ),
    )
    parser.set_defaults(run=run, num_prompts=16, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    from ..generation.plots import plot_throughput
    from ..generation.throughput import Speculation, resolve_pad_token_id, run_throughput, throughput_table

    model_options, progress, prompt_options, generation, speculation_options, options = dataclasses_from(
        args, ARGUMENT_TYPES
    )
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise SystemExit(f"hf-layerskip throughput: batch sizes must be at least 1, got {options.batch_sizes}.")
    if options.warmup < 0:
        raise SystemExit(f"hf-layerskip throughput: --warmup must be at least 0, got {options.warmup}.")
    if options.repeats < 1:
        raise SystemExit(f"hf-layerskip throughput: --repeats must be at least 1, got {options.repeats}.")
    plot_path = Path(options.plot or Path(options.output).with_suffix(".png"))
    # Folders made before measuring, so that a long run cannot fail at its end for want of one.
    for path in [options.output, plot_path, *([options.markdown] if options.markdown else [])]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_options.model, model_options.dtype, model_options.device, "throughput")
    speculation = Speculation(*speculation_options.resolve(model, "throughput"))
    prompts, encoded = load_encoded_prompts(prompt_options, tokenizer, model.device)

    result = run_throughput(
        model,
        encoded,
        list(options.batch_sizes),
        generation.max_new_tokens,
        speculation,
        resolve_pad_token_id(model.generation_config, tokenizer),
        warmup=options.warmup,
        progress=not progress.no_progress,
        repeats=options.repeats,
    )
    result.settings.update(
        prompt_source=prompt_options.prompts,
        first_prompt=prompt_options.first_prompt,
        prompt_ids=[p.id for p in prompts],
        chat_template=prompt_options.chat_template,
    )
    machine = result.machine
    hardware = machine.get("gpu") or machine.get("cpu_model") or machine["processor"]
    mismatches = sum(s.mismatches for s in result.summaries)
    mismatch_note = "0 expected"
    if result.settings["dtype"] != "float32":
        mismatch_note += " in float32; half precision may part at numerical near-ties"
    text = "\n".join(
        [
            f"Machine: {hardware} ({machine['cpu_count']} CPUs, torch {machine['torch']}, "
            f"{machine['torch_threads']} threads), device {machine['device']}, dtype {result.settings['dtype']}",
            f"{len(prompts)} {prompt_options.prompts} prompts in groups of B, {generation.max_new_tokens} new tokens "
            f"max, greedy; E={speculation.exit_layer}, d={speculation.num_speculations}, "
            f"t={speculation.confidence_threshold:g}, lookup={speculation.lookup_tokens}; peak memory: {result.settings['memory_method']}",
            "",
            throughput_table(result.summaries),
            "",
            f"rows differing from plain batched greedy decoding: {mismatches} ({mismatch_note})",
        ]
    )
    print(text)
    if options.markdown:
        Path(options.markdown).write_text(text + "\n")
    write_json(options.output, result.to_dict())
    tokens_per_s = {}
    for summary in result.summaries:
        tokens_per_s.setdefault(summary.strategy, {})[summary.batch_size] = summary.tokens_per_s
    plot_throughput(tokens_per_s, plot_path)
    print(f"\nwrote {options.output} and {plot_path}")
    return 0
