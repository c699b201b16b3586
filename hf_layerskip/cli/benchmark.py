"""`hf-layerskip benchmark`: plain, early-exit, self-speculative and transformers' built-in decoding, side by side."""

import argparse

from .measure_options import (
    add_generation_arguments,
    add_model_arguments,
    add_prompt_arguments,
    check_exit_layers,
    load_encoded_prompts,
    load_model,
    write_json,
)

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
    "τ = (1 − α^(d+1)) / (1 − α) tokens, and the ideal speedup is τ / ((d·c_draft + c_verify) / c_full). The "
    "benchmark reports it with the measured speedup and the fraction of the ideal that was reached."
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
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
    add_model_arguments(parser)
    add_prompt_arguments(parser, default_count=10)
    add_generation_arguments(parser, default_new_tokens=64)
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGY_HELP),
        help=f"comma-separated strategies to run, from {', '.join(STRATEGY_HELP)}; plain always runs (default: all)",
    )
    parser.add_argument(
        "--exit-layer",
        type=int,
        metavar="E",
        help="exit layer E for early exit and drafting (default: the checkpoint's exit_layer)",
    )
    parser.add_argument(
        "--num-speculations",
        type=int,
        metavar="D",
        help="draft tokens per round d (default: the checkpoint's num_speculations)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="N",
        help="unmeasured runs of every strategy on the first N prompts (default 1)",
    )
    parser.add_argument(
        "--cost-repeats",
        type=int,
        default=20,
        metavar="N",
        help="timed repeats of each step for the analytic bound; the median counts (default 20)",
    )
    parser.add_argument(
        "--output", default="benchmark.json", metavar="PATH", help="JSON file for all figures (default benchmark.json)"
    )
    parser.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="also write the printed tables to this file (default: only print them)",
    )
    parser.set_defaults(run=run)


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
    from ..generation.strategies import standard_strategies

    kinds = parse_strategies(args.strategies)
    model, tokenizer = load_model(args.model, args.dtype, args.device, "benchmark")
    exit_layer = args.exit_layer if args.exit_layer is not None else model.config.exit_layer
    speculations = args.num_speculations if args.num_speculations is not None else model.config.num_speculations
    if kinds != ["plain"]:
        check_exit_layers([exit_layer], model, "benchmark")
    prompts, encoded = load_encoded_prompts(args, tokenizer, model.device)

    result = run_benchmark(
        model,
        tokenizer,
        prompts,
        encoded,
        standard_strategies(kinds, exit_layer, speculations),
        args.max_new_tokens,
        warmup=args.warmup,
        cost_repeats=args.cost_repeats,
        progress=not args.no_progress,
    )
    result.settings.update(prompt_source=args.prompts, chat_template=args.chat_template)
    machine = result.machine
    hardware = machine.get("gpu") or machine.get("cpu_model") or machine["processor"]
    lines = [
        f"Machine: {hardware} ({machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads), "
        f"device {machine['device']}, dtype {result.settings['dtype']}",
        f"{len(prompts)} {args.prompts} prompts, {args.max_new_tokens} new tokens max, greedy; "
        f"peak memory: {result.settings['memory_method']}",
        "",
        markdown_table(result.summaries),
    ]
    if result.bounds:
        lines += [
            "",
            "Analytic bound: ideal speedup = τ(α,d) / ((d·c_draft + c_verify)/c_full), τ = (1−α^(d+1))/(1−α)",
            "",
        ]
        lines.append(bounds_table(result.bounds))
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(text + "\n")
    write_json(args.output, result.to_dict())
    print(f"\nwrote {args.output}")
    return 0
