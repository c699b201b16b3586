"""`hf-layerskip benchmark`: plain, early-exit, self-speculative and transformers' built-in decoding, side by side."""

import argparse
from dataclasses import dataclass, field

from .measure_options import (
    GenerationArguments,
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    SpeculationArguments,
    check_exit_layers,
    load_encoded_prompts,
    load_model,
    parse_pairs,
    write_json,
)
from .parsing import add_dataclass_command, dataclasses_from

STRATEGY_HELP = {
    "plain": "greedy decoding with all layers (the baseline)",
    "early_exit": "greedy decoding with the first E layers only (lossy)",
    "self_speculative": "this package's self-speculative decoding at (E, d): one shared KV cache (lossless)",
    "builtin": "transformers' built-in assistant_early_exit at (E, d) on the same weights (lossless)",
}

BOUND_HELP = (
    "Analytic bound: the costs of one plain step (c_full), one draft step at E (c_draft) and one verification pass "
    "of d drafts (c_verify) are measured in the same run; with per-token acceptance α (fitted so that "
    "α + α² + … + α^d equals the measured mean accepted drafts per round), a round yields "
    "τ = (1 − α^(d+1)) / (1 − α) tokens, and the ideal speedup is τ / ((s·c_draft + c_verify) / c_full), s the "
    "measured draft steps per round (d without a confidence threshold). The "
    "benchmark reports it with the measured speedup and the fraction of the ideal that was reached."
)


@dataclass
class BenchmarkArguments:
    _argument_group_name = "benchmark"

    strategies: str = field(
        default=",".join(STRATEGY_HELP),
        metadata={
            "help": f"Comma-separated strategies to run, from {', '.join(STRATEGY_HELP)}; plain always runs (default: "
            "all)."
        },
    )
    builtin_pair: str | None = field(
        default=None,
        metadata={
            "help": "E:d of the builtin strategy, e.g. 28:1 to compare each path at its own best pair (unset: the same "
            "E and d as self_speculative).",
            "metavar": "E:D",
        },
    )
    warmup: int = field(
        default=1, metadata={"help": "Unmeasured runs of every strategy on the first N prompts.", "metavar": "N"}
    )
    cost_repeats: int = field(
        default=20,
        metadata={"help": "Timed repeats of each step for the analytic bound; the median counts.", "metavar": "N"},
    )
    output: str = field(default="benchmark.json", metadata={"help": "JSON file for all figures.", "metavar": "PATH"})
    markdown: str | None = field(
        default=None,
        metadata={"help": "Also write the printed tables to this file (unset: only print them).", "metavar": "PATH"},
    )


ARGUMENT_TYPES = [
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    GenerationArguments,
    SpeculationArguments,
    BenchmarkArguments,
]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "benchmark",
        ARGUMENT_TYPES,
        help="time decoding strategies against plain greedy decoding",
        description=(
            "Greedy-decode the same prompts with each strategy and compare speed, acceptance, memory, ROUGE-L and "
            "exactness. Strategies: "
            + "; ".join(f"{name}: {text}" for name, text in STRATEGY_HELP.items())
            + ". Runs are interleaved per prompt (the strategy order rotates from prompt to prompt) so that machine "
            "drift cancels; warm-up runs are excluded. Metrics: tokens/s (mean and median over prompts), ms per "
            "token, speedup (plain's ms/token over the strategy's), acceptance rate (accepted / drafted), tokens per "
            "round, peak memory (absolute, weights included; CUDA: torch.cuda.max_memory_allocated; CPU on Linux: "
            "the process's peak resident set size during the call, reset through /proc/self/clear_refs), ROUGE-L "
            "against the references when the prompts have them (rouge-score package), and how many outputs differ from "
            "plain greedy (0 expected for the lossless strategies). " + BOUND_HELP + " Prints markdown tables and "
            "writes a JSON file."
        ),
    )
    parser.set_defaults(run=run, num_prompts=10, max_new_tokens=64)


def parse_strategies(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in STRATEGY_HELP]
    if unknown:
        raise SystemExit(
            f"hf-layerskip benchmark: unknown strategies {unknown}; choose from {', '.join(STRATEGY_HELP)}."
        )
    return ["plain", *[k for k in dict.fromkeys(kinds) if k != "plain"]]


def run(args: argparse.Namespace) -> int:
    from ..generation.benchmark import bounds_table, run_benchmark
    from ..generation.metrics import markdown_table
    from ..generation.strategies import Strategy, standard_strategies

    model_options, progress, prompt_options, generation, speculation, options = dataclasses_from(args, ARGUMENT_TYPES)
    kinds = parse_strategies(options.strategies)
    model, tokenizer = load_model(model_options.model, model_options.dtype, model_options.device, "benchmark")
    exit_layer, speculations, threshold, lookup = speculation.resolve(model, "benchmark")
    prompts, encoded = load_encoded_prompts(prompt_options, tokenizer, model.device)

    strategies = standard_strategies(kinds, exit_layer, speculations, threshold, lookup)
    if options.builtin_pair is not None:
        try:
            pairs = parse_pairs(options.builtin_pair)
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"hf-layerskip benchmark: --builtin-pair: {error}") from None
        if len(pairs) != 1:
            raise SystemExit(f"hf-layerskip benchmark: --builtin-pair takes one E:d pair, got {options.builtin_pair!r}.")
        ((builtin_exit, builtin_speculations),) = pairs
        check_exit_layers([builtin_exit], model, "benchmark")
        builtin = Strategy("builtin", builtin_exit, builtin_speculations)
        strategies = [builtin if s.kind == "builtin" else s for s in strategies]
    result = run_benchmark(
        model,
        tokenizer,
        prompts,
        encoded,
        strategies,
        generation.max_new_tokens,
        warmup=options.warmup,
        cost_repeats=options.cost_repeats,
        progress=not progress.no_progress,
    )
    result.settings.update(prompt_source=prompt_options.prompts, chat_template=prompt_options.chat_template)
    machine = result.machine
    hardware = machine.get("gpu") or machine.get("cpu_model") or machine["processor"]
    lines = [
        f"Machine: {hardware} ({machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads), "
        f"device {machine['device']}, dtype {result.settings['dtype']}",
        f"{len(prompts)} {prompt_options.prompts} prompts, {generation.max_new_tokens} new tokens max, greedy; "
        f"peak memory: {result.settings['memory_method']}",
        "",
        markdown_table(result.summaries),
    ]
    if result.bounds:
        lines += [
            "",
            "Analytic bound: ideal speedup = τ(α,d) / ((s·c_draft + c_verify)/c_full), τ = (1−α^(d+1))/(1−α), "
            "s = draft steps per round",
            "",
        ]
        lines.append(bounds_table(result.bounds))
    text = "\n".join(lines)
    print(text)
    if options.markdown:
        with open(options.markdown, "w") as file:
            file.write(text + "\n")
    write_json(options.output, result.to_dict())
    print(f"\nwrote {options.output}")
    return 0
