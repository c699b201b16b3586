"""`hf-layerskip correctness`: greedy self-speculative decoding must equal plain greedy decoding, token for token."""

import argparse
from dataclasses import dataclass, field

from .measure_options import (
    GenerationArguments,
    ModelArguments,
    ProgressArguments,
    PromptArguments,
    check_exit_layers,
    load_encoded_prompts,
    load_model,
    parse_pairs,
    write_json,
)
from .parsing import add_dataclass_command, dataclasses_from


@dataclass
class CorrectnessArguments:
    _argument_group_name = "correctness check"

    pairs: str | None = field(
        default=None,
        metadata={
            "help": "(exit layer, draft length) pairs, e.g. 8:2,20:4 (unset: E at L/4, L/2 and 3L/4, each with d = 1 "
            "and 4).",
            "metavar": "E:d,...",
        },
    )
    tie_tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Largest logit gap that counts as a numerical tie (unset, by dtype: float32 1e-3; bfloat16 and "
            "float16 two units in the last place at the logit's magnitude, e.g. 0.25 for a bfloat16 logit of 20).",
            "metavar": "GAP",
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "Also write every check to this JSON file.", "metavar": "PATH"}
    )


ARGUMENT_TYPES = [ModelArguments, ProgressArguments, PromptArguments, GenerationArguments, CorrectnessArguments]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "correctness",
        ARGUMENT_TYPES,
        help="check that greedy self-speculative decoding equals plain greedy decoding (exit 1 on a mismatch)",
        description=(
            "Greedy-decode each prompt plainly, then self-speculatively at every (E, d) pair, and compare the new "
            "tokens. Exits with status 1 on any mismatch, and reports for each the first differing position and "
            "whether it sits at a numerical tie: the full model's logit gap there between the plain token and the "
            "speculative one is at most --tie-tolerance (then the verification pass, which processes several "
            "positions at once, may legitimately round the other way)."
        ),
    )
    parser.set_defaults(run=run, num_prompts=10, max_new_tokens=64)


def default_pairs(num_layers: int) -> list[tuple[int, int]]:
    exit_layers = sorted({max(num_layers * k // 4, 1) for k in (1, 2, 3)})
    return [(e, d) for e in exit_layers for d in (1, 4)]


def run(args: argparse.Namespace) -> int:
    from ..generation.correctness import check_correctness

    model_options, progress, prompt_options, generation, options = dataclasses_from(args, ARGUMENT_TYPES)
    try:
        pairs = parse_pairs(options.pairs) if options.pairs else None
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"hf-layerskip correctness: --pairs: {error}") from None
    model, tokenizer = load_model(model_options.model, model_options.dtype, model_options.device, "correctness")
    pairs = pairs or default_pairs(model.config.num_hidden_layers)
    check_exit_layers([e for e, _ in pairs], model, "correctness")
    if min(d for _, d in pairs) < 1:
        raise SystemExit(f"hf-layerskip correctness: draft lengths must be at least 1, got {pairs}.")
    prompts, encoded = load_encoded_prompts(prompt_options, tokenizer, model.device)
    checks = check_correctness(
        model,
        [p.id for p in prompts],
        encoded,
        pairs,
        generation.max_new_tokens,
        options.tie_tolerance,
        not progress.no_progress,
    )

    failures = [c for c in checks if not c.passed]
    for exit_layer, speculations in pairs:
        mine = [c for c in checks if (c.exit_layer, c.num_speculations) == (exit_layer, speculations)]
        rate = sum(c.acceptance_rate for c in mine) / len(mine)
        bad = sum(not c.passed for c in mine)
        print(
            f"E={exit_layer} d={speculations}: {len(mine) - bad}/{len(mine)} prompts identical, "
            f"mean acceptance {rate:.3f}"
        )
    for c in failures:
        where = f"first mismatch at new token {c.mismatch_position}"
        if c.logit_gap is None:
            detail = "one output ended earlier"
        else:
            detail = (
                f"plain {c.plain_token} vs speculative {c.speculative_token}, logit gap {c.logit_gap:.3g} "
                f"({'numerical tie' if c.is_tie else 'not a tie'})"
            )
        print(f"MISMATCH {c.prompt_id} E={c.exit_layer} d={c.num_speculations}: {where}: {detail}")
    if options.output:
        write_json(options.output, {"pairs": pairs, "checks": [c.to_dict() for c in checks]})
    print(f"{len(failures)} mismatches in {len(checks)} checks")
    return 1 if failures else 0
