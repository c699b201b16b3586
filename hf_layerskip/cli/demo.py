"""`hf-layerskip demo`: plain and self-speculative greedy decoding of a few prompts, side by side, with the tokens
coloured by who produced them (the early-exit draft or the full model's verification)."""

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

from ..generation.demo import DemoResult, DemoSummary
from ..generation.metrics import machine_description
from .measure_options import (
    GenerationArguments,
    ModelArguments,
    SpeculationArguments,
    load_model,
    write_json,
)
from .parsing import add_dataclass_command, dataclasses_from

# The last 40 of HumanEval's 164 problems, held out from everything the default model was built from: its draft
# head trained on the greedy continuations of problems 0..99, and its settings were chosen on 100..123.
HELD_OUT_PROBLEMS = range(124, 164)
DEFAULT_PROBLEMS = (124, 130, 140)

# ANSI SGR codes: drafted (accepted early-exit) tokens green, verified (full-model) tokens yellow.
DRAFTED_COLOR = "\x1b[32m"
VERIFIED_COLOR = "\x1b[33m"
RESET = "\x1b[0m"


@dataclass
class DemoArguments:
    _argument_group_name = "demo"

    prompts: int | None = field(
        default=None,
        metadata={
            "help": f"Use the first N of the held-out HumanEval problems {HELD_OUT_PROBLEMS.start}.."
            f"{HELD_OUT_PROBLEMS.stop - 1} instead of the default three.",
            "metavar": "N",
        },
    )
    prompt: list[str] | None = field(
        default=None,
        metadata={
            "help": "A prompt of your own, fed as raw text (repeat for several); replaces the HumanEval problems.",
            "metavar": "TEXT",
            "action": "extend",
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "Also write every figure to this JSON file.", "metavar": "PATH"}
    )
    color: str = field(
        default="auto",
        metadata={
            "help": "Colour drafted and verified tokens; auto: only when stdout is a terminal and NO_COLOR is not set.",
            "choices": ["auto", "always", "never"],
        },
    )

    def __post_init__(self):
        if self.prompt and self.prompts is not None:
            raise ValueError("argument --prompt: not allowed with argument --prompts (own prompts or HumanEval ones)")


ARGUMENT_TYPES = [ModelArguments, GenerationArguments, SpeculationArguments, DemoArguments]


def add_parser(subparsers) -> None:
    parser = add_dataclass_command(
        subparsers,
        "demo",
        ARGUMENT_TYPES,
        check_on_parse=True,
        help="decode a few coding prompts plainly and self-speculatively: speed, acceptance, who made each token",
        description=(
            "Greedy-decode each prompt twice, plainly and self-speculatively (draft with the first E layers, verify "
            "with the rest), after one short unmeasured warm-up. Prints the self-speculative completion with the "
            "accepted drafted tokens in green and the full model's verification tokens in yellow (on a terminal), "
            "then whether both runs gave the same tokens, their speeds (tokens/s), the speedup, the acceptance rate "
            "and the drafted and verified token counts; finally a summary over all prompts. Prompts: HumanEval "
            f"problems {', '.join(map(str, DEFAULT_PROBLEMS))} from the held-out range {HELD_OUT_PROBLEMS.start}.."
            f"{HELD_OUT_PROBLEMS.stop - 1}, fed as raw text (no chat template). Always exits 0: in bfloat16 a "
            "numerical tie can make the outputs differ, which is reported."
        ),
    )
    parser.set_defaults(run=run, max_new_tokens=128)


def token_pieces(tokenizer, token_ids) -> list[str]:
    """The text each token adds, such that the pieces join to the decoded sequence.

    Decodes growing prefixes and keeps the difference: SentencePiece's leading-space handling and byte-level
    tokens that split one UTF-8 character then render as in the whole text. A token that ends inside a
    character adds nothing; the token that completes it adds the whole character. Special tokens add nothing.
    """
    token_ids = [int(t) for t in token_ids]
    pieces, shown = [], ""
    for end in range(1, len(token_ids) + 1):
        text = tokenizer.decode(token_ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and end < len(token_ids):
            pieces.append("")  # an incomplete UTF-8 character so far
            continue
        pieces.append(text[len(shown) :])
        shown = text
    return pieces


def use_color(choice: str, stream=None, environ=None) -> bool:
    """`always`, `never`, or `auto`: a terminal `stream` and no `NO_COLOR` (set and non-empty, per no-color.org)."""
    if choice != "auto":
        return choice == "always"
    stream = sys.stdout if stream is None else stream
    environ = os.environ if environ is None else environ
    return stream.isatty() and not environ.get("NO_COLOR")


def render_completion(tokenizer, result: DemoResult, color: bool) -> str:
    """The self-speculative completion; with `color`, each drafted token green and each verified token yellow."""
    pieces = token_pieces(tokenizer, result.speculative_tokens)
    if not color:
        return "".join(pieces)
    return "".join(
        f"{DRAFTED_COLOR if drafted else VERIFIED_COLOR}{piece}{RESET}"
        for piece, drafted in zip(pieces, result.from_draft.tolist())
    )


def describe_result(tokenizer, result: DemoResult, dtype: torch.dtype) -> list[str]:
    """The per-prompt figures, plus where and why the outputs differ when they do."""
    lines = [
        f"identical: {'yes' if result.identical else 'no'} | plain {result.plain_tokens_per_second:.1f} tok/s | "
        f"self-speculative {result.speculative_tokens_per_second:.1f} tok/s | speedup {result.speedup:.2f}x | "
        f"acceptance {result.acceptance_rate:.2f} ({result.accepted_tokens}/{result.drafted_tokens} drafts "
        f"accepted) | {len(result.speculative_tokens)} tokens: {result.num_drafted_kept} drafted, "
        f"{result.num_verified} verified"
    ]
    if result.identical:
        return lines
    position = result.mismatch_position
    if result.logit_gap is None:
        lines.append(f"outputs differ from new token {position} on: one run stopped earlier")
        return lines
    plain_token, other_token = int(result.plain_tokens[position]), int(result.speculative_tokens[position])
    detail = (
        f"outputs differ from new token {position} on: plain {tokenizer.decode([plain_token])!r} vs "
        f"self-speculative {tokenizer.decode([other_token])!r}, full-model logit gap {result.logit_gap:.3g}"
    )
    if result.is_tie:
        detail += (
            f": a numerical tie in {str(dtype).removeprefix('torch.')} (verification scores several positions in "
            "one pass, whose different rounding can flip a near-equal argmax); either token is a greedy choice"
        )
    else:
        detail += ": not a numerical tie"
    lines.append(detail)
    return lines


def summary_table(results: list[DemoResult]) -> str:
    """One row per prompt, then the overall row: total speeds, median speedup, pooled acceptance, identical count."""
    header = ("prompt", "tokens", "plain tok/s", "self-spec tok/s", "speedup", "acceptance", "identical")
    rows = [
        (
            r.prompt_id,
            str(len(r.speculative_tokens)),
            f"{r.plain_tokens_per_second:.1f}",
            f"{r.speculative_tokens_per_second:.1f}",
            f"{r.speedup:.2f}x",
            f"{r.acceptance_rate:.2f}",
            "yes" if r.identical else "no",
        )
        for r in results
    ]
    total = DemoSummary.of(results)
    rows.append(
        (
            "all",
            str(total.new_tokens),
            f"{total.plain_tokens_per_second:.1f}",
            f"{total.speculative_tokens_per_second:.1f}",
            f"{total.median_speedup:.2f}x median",
            f"{total.acceptance_rate:.2f}",
            f"{total.identical}/{total.prompts}",
        )
    )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def legend(exit_layer: int, num_layers: int) -> str:
    return (
        f"legend: {DRAFTED_COLOR}drafted by layers 1-{exit_layer} and accepted{RESET}, "
        f"{VERIFIED_COLOR}produced by the full model ({num_layers} layers) while verifying{RESET}"
    )


def choose_prompts(options: DemoArguments) -> list[tuple[str, str]]:
    """`(prompt_id, text)` pairs: the `--prompt` texts, the first `--prompts` held-out problems, or the default 3."""
    from ..generation.data import load_humaneval

    if options.prompt:
        return [(f"prompt {number}", text) for number, text in enumerate(options.prompt, 1)]
    if options.prompts is None:
        indices = list(DEFAULT_PROBLEMS)
    elif 1 <= options.prompts <= len(HELD_OUT_PROBLEMS):
        indices = list(HELD_OUT_PROBLEMS[: options.prompts])
    else:
        raise SystemExit(
            f"hf-layerskip demo: --prompts must be in [1, {len(HELD_OUT_PROBLEMS)}], got {options.prompts}."
        )
    return [(example.id, example.prompt) for example in load_humaneval(indices)]


def run(args: argparse.Namespace) -> int:
    from ..defaults import DRAFT_HEAD_SETTINGS
    from ..generation.demo import run_demo

    model_options, generation, speculation, options = dataclasses_from(args, ARGUMENT_TYPES)
    max_new_tokens = generation.max_new_tokens
    if max_new_tokens < 1:
        raise SystemExit(f"hf-layerskip demo: --max-new-tokens must be at least 1, got {max_new_tokens}.")
    prompts = choose_prompts(options)
    model, tokenizer = load_model(model_options.model, model_options.dtype, model_options.device, "demo")
    exit_layer, speculations, threshold, lookup = speculation.resolve(model, "demo")
    num_layers = model.config.num_hidden_layers
    color = use_color(options.color)

    print(
        f"self-speculative decoding: draft with layers 1-{exit_layer} of {num_layers}, up to {speculations} per "
        f"round{f' while the exit is at least {threshold:g} confident' if threshold else ''}"
        f"{f', or up to {lookup} looked up where the text repeats itself' if lookup else ''}; "
        f"greedy, up to {max_new_tokens} new tokens, {str(model.dtype).removeprefix('torch.')} on {model.device}",
        flush=True,
    )

    def show(result: DemoResult) -> None:
        print(f"\n=== {result.prompt_id} ===")
        print(render_completion(tokenizer, result, color))
        print("\n".join(describe_result(tokenizer, result, model.dtype)), flush=True)

    results = run_demo(
        model,
        tokenizer,
        prompts,
        exit_layer,
        speculations,
        max_new_tokens,
        confidence_threshold=threshold,
        lookup_tokens=lookup,
        on_result=show,
    )
    print("\n" + summary_table(results))
    if color:
        print(legend(exit_layer, num_layers))
    if options.output:
        settings = {"command": args.command, **asdict(model_options), **asdict(generation), **asdict(options)}
        settings.update(
            model=str(model.config._name_or_path),
            exit_layer=exit_layer,
            num_speculations=speculations,
            confidence_threshold=threshold,
            lookup_tokens=lookup,
            dtype=str(model.dtype).removeprefix("torch."),
            draft_head={name: getattr(model.config, name) for name in DRAFT_HEAD_SETTINGS},
            machine=machine_description(model.device),
        )
        total = DemoSummary.of(results)
        summary = {
            "median_speedup": total.median_speedup,
            "acceptance_rate": total.acceptance_rate,
            "identical": total.identical,
            "prompts": total.prompts,
        }
        write_json(
            options.output, {"settings": settings, "summary": summary, "per_prompt": [r.to_dict() for r in results]}
        )
        print(f"wrote {options.output}")
    return 0
