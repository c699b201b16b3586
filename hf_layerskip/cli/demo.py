"""`hf-layerskip demo`: plain and self-speculative greedy decoding of a few prompts, side by side, with the tokens
coloured by who produced them (the early-exit draft or the full model's verification)."""

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generation.metrics import machine_description
from ..modeling.self_speculative import acceptance_rate
from .measure_options import DTYPES, check_exit_layers, load_model, write_json

# The last 40 of HumanEval's 164 problems, held out from choosing the default model's exit layer and draft length
# (its sweep used problems 0..123; its training data holds no HumanEval problem).
HELD_OUT_PROBLEMS = range(124, 164)
DEFAULT_PROBLEMS = (124, 130, 140)
DEMO_DTYPES = ("float32", "bfloat16")
WARMUP_NEW_TOKENS = 8

# ANSI SGR codes: drafted (accepted early-exit) tokens green, verified (full-model) tokens yellow.
DRAFTED_COLOR = "\x1b[32m"
VERIFIED_COLOR = "\x1b[33m"
RESET = "\x1b[0m"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
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
    parser.add_argument(
        "--model",
        default=None,
        help="LayerSkip checkpoint directory (default: the default model, SmolLM2-135M-Instruct with the shipped "
        "LayerSkip adapter, built on first use)",
    )
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompts",
        type=int,
        metavar="N",
        help=f"use the first N of the held-out HumanEval problems {HELD_OUT_PROBLEMS.start}.."
        f"{HELD_OUT_PROBLEMS.stop - 1} instead of the default three",
    )
    prompts.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt of your own, fed as raw text (repeat for several); replaces the HumanEval problems",
    )
    parser.add_argument(
        "--exit-layer", type=int, metavar="E", help="draft with layers 1..E (default: the checkpoint's exit_layer)"
    )
    parser.add_argument(
        "--num-speculations",
        type=int,
        metavar="D",
        help="draft tokens per round (default: the checkpoint's num_speculations)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, metavar="N", help="greedy tokens per prompt; EOS stops earlier "
        "(default 128)"
    )
    parser.add_argument(
        "--dtype",
        choices=DEMO_DTYPES,
        default="float32",
        help="compute dtype (default float32: exact, and faster than bfloat16 for this small model on the 2-core "
        "development CPU)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu, cuda or cuda:N; 'auto' picks cuda when available (default cpu)",
    )
    parser.add_argument(
        "--output", default=None, metavar="PATH", help="also write every figure to this JSON file (default: none)"
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour drafted and verified tokens; auto: only when stdout is a terminal and NO_COLOR is not set "
        "(default auto)",
    )
    parser.set_defaults(run=run)


@dataclass
class DemoResult:
    """One prompt decoded plainly and self-speculatively.

    `plain_tokens` `(num_plain,)` and `speculative_tokens` `(num_new,)` are the new token ids; `from_draft`
    `(num_new,)` is True where the early exit drafted the token and the full model accepted it. On a difference,
    `mismatch_position` is the first differing new-token index and `logit_gap` the full model's logit of plain's
    token minus that of the speculative one there (`None` when one output merely ended sooner).
    """

    prompt_id: str
    plain_tokens: torch.LongTensor
    speculative_tokens: torch.LongTensor
    from_draft: torch.BoolTensor
    plain_seconds: float
    speculative_seconds: float
    drafted_tokens: int
    accepted_tokens: int
    mismatch_position: int | None = None
    logit_gap: float | None = None
    is_tie: bool | None = None

    @property
    def identical(self) -> bool:
        return self.mismatch_position is None

    @property
    def plain_tokens_per_second(self) -> float:
        return len(self.plain_tokens) / self.plain_seconds

    @property
    def speculative_tokens_per_second(self) -> float:
        return len(self.speculative_tokens) / self.speculative_seconds

    @property
    def speedup(self) -> float:
        """Self-speculative tokens/s over plain tokens/s (per token, so a length difference does not skew it)."""
        return self.speculative_tokens_per_second / self.plain_tokens_per_second

    @property
    def acceptance_rate(self) -> float:
        return acceptance_rate(self.accepted_tokens, self.drafted_tokens)

    @property
    def num_drafted_kept(self) -> int:
        """New tokens that came from the draft (accepted drafts)."""
        return int(self.from_draft.sum())

    @property
    def num_verified(self) -> int:
        """New tokens that the full model's verification produced."""
        return len(self.speculative_tokens) - self.num_drafted_kept

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "new_tokens": len(self.speculative_tokens),
            "plain_tokens_per_second": self.plain_tokens_per_second,
            "speculative_tokens_per_second": self.speculative_tokens_per_second,
            "speedup": self.speedup,
            "acceptance_rate": self.acceptance_rate,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "tokens_from_draft": self.num_drafted_kept,
            "tokens_from_verification": self.num_verified,
            "identical": self.identical,
            "mismatch_position": self.mismatch_position,
            "logit_gap": self.logit_gap,
            "is_tie": self.is_tie,
        }


@torch.inference_mode()
def run_demo(
    model,
    tokenizer,
    prompts: list[tuple[str, str]],
    exit_layer: int,
    num_speculations: int,
    max_new_tokens: int = 128,
    tie_tolerance: float | None = None,
    on_result: Callable[[DemoResult], None] | None = None,
) -> list[DemoResult]:
    """Greedy-decodes each `(prompt_id, text)` plainly, then self-speculatively at `(exit_layer, num_speculations)`.

    One short unmeasured warm-up of both modes on the first prompt comes first. A difference at a logit gap of at
    most `tie_tolerance` (default by dtype, as `hf-layerskip correctness`) counts as a numerical tie. `on_result`
    sees each result as soon as it is measured (to show it while the next prompt decodes).
    """
    from ..generation.correctness import DEFAULT_TIE_TOLERANCE, logit_gap
    from ..generation.metrics import first_mismatch
    from ..generation.strategies import Strategy, StrategyRunner

    tolerance = DEFAULT_TIE_TOLERANCE.get(model.dtype, 1e-1) if tie_tolerance is None else tie_tolerance
    common = {}
    if tokenizer.pad_token_id is None and model.generation_config.pad_token_id is None:
        common["pad_token_id"] = tokenizer.eos_token_id
    plain, speculative = Strategy("plain"), Strategy("self_speculative", exit_layer, num_speculations)
    runner = StrategyRunner(model)
    encoded = [tokenizer(text, return_tensors="pt")["input_ids"].to(model.device) for _, text in prompts]

    for strategy in (plain, speculative):
        runner.run(strategy, encoded[0], min(WARMUP_NEW_TOKENS, max_new_tokens), **common)

    results = []
    for (prompt_id, _), input_ids in zip(prompts, encoded):
        plain_record = runner.run(plain, input_ids, max_new_tokens, **common)
        record = runner.run(speculative, input_ids, max_new_tokens, **common)
        result = DemoResult(
            prompt_id=prompt_id,
            plain_tokens=plain_record.new_tokens,
            speculative_tokens=record.new_tokens,
            from_draft=record.from_draft,
            plain_seconds=plain_record.seconds,
            speculative_seconds=record.seconds,
            drafted_tokens=record.drafted_tokens,
            accepted_tokens=record.accepted_tokens,
        )
        result.mismatch_position = first_mismatch(result.plain_tokens, result.speculative_tokens)
        position = result.mismatch_position
        if position is not None and position < min(len(result.plain_tokens), len(result.speculative_tokens)):
            other = int(result.speculative_tokens[position])
            result.logit_gap = logit_gap(model, input_ids, result.plain_tokens, position, other)
            result.is_tie = abs(result.logit_gap) <= tolerance
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


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
    drafted = sum(r.drafted_tokens for r in results)
    accepted = sum(r.accepted_tokens for r in results)
    rows.append(
        (
            "all",
            str(sum(len(r.speculative_tokens) for r in results)),
            f"{sum(len(r.plain_tokens) for r in results) / sum(r.plain_seconds for r in results):.1f}",
            f"{sum(len(r.speculative_tokens) for r in results) / sum(r.speculative_seconds for r in results):.1f}",
            f"{statistics.median(r.speedup for r in results):.2f}x median",
            f"{acceptance_rate(accepted, drafted):.2f}",
            f"{sum(r.identical for r in results)}/{len(results)}",
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


def choose_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """`(prompt_id, text)` pairs: the `--prompt` texts, the first `--prompts` held-out problems, or the default 3."""
    from ..generation.data import load_humaneval

    if args.prompt:
        return [(f"prompt {number}", text) for number, text in enumerate(args.prompt, 1)]
    if args.prompts is None:
        indices = list(DEFAULT_PROBLEMS)
    elif 1 <= args.prompts <= len(HELD_OUT_PROBLEMS):
        indices = list(HELD_OUT_PROBLEMS[: args.prompts])
    else:
        raise SystemExit(f"hf-layerskip demo: --prompts must be in [1, {len(HELD_OUT_PROBLEMS)}], got {args.prompts}.")
    return [(example.id, example.prompt) for example in load_humaneval(indices)]


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise SystemExit(f"hf-layerskip demo: --max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    prompts = choose_prompts(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device, "demo")
    exit_layer = model.config.exit_layer if args.exit_layer is None else args.exit_layer
    speculations = model.config.num_speculations if args.num_speculations is None else args.num_speculations
    check_exit_layers([exit_layer], model, "demo")
    if speculations < 1:
        raise SystemExit(f"hf-layerskip demo: --num-speculations must be at least 1, got {speculations}.")
    num_layers = model.config.num_hidden_layers
    color = use_color(args.color)

    print(
        f"self-speculative decoding: draft with layers 1-{exit_layer} of {num_layers}, {speculations} per round; "
        f"greedy, up to {args.max_new_tokens} new tokens, {args.dtype} on {model.device}",
        flush=True,
    )

    def show(result: DemoResult) -> None:
        print(f"\n=== {result.prompt_id} ===")
        print(render_completion(tokenizer, result, color))
        print("\n".join(describe_result(tokenizer, result, DTYPES[args.dtype])), flush=True)

    results = run_demo(model, tokenizer, prompts, exit_layer, speculations, args.max_new_tokens, on_result=show)
    print("\n" + summary_table(results))
    if color:
        print(legend(exit_layer, num_layers))
    if args.output:
        settings = dict(vars(args), model=str(model.config._name_or_path), exit_layer=exit_layer)
        settings.update(num_speculations=speculations, machine=machine_description(model.device))
        summary = {
            "median_speedup": statistics.median(r.speedup for r in results),
            "acceptance_rate": acceptance_rate(
                sum(r.accepted_tokens for r in results), sum(r.drafted_tokens for r in results)
            ),
            "identical": sum(r.identical for r in results),
            "prompts": len(results),
        }
        settings = {k: v for k, v in settings.items() if k != "run"}
        write_json(args.output, {"settings": settings, "summary": summary, "per_prompt": [r.to_dict() for r in results]})
        print(f"wrote {args.output}")
    return 0
