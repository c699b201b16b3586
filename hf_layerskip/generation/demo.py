"""The demo's measurement: each prompt decoded plainly and self-speculatively, compared token for token.

`hf-layerskip demo` renders these results (colours, token pieces, tables); nothing here prints.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..modeling.self_speculative import acceptance_rate
from .correctness import find_mismatch
from .strategies import Strategy, StrategyRunner

WARMUP_NEW_TOKENS = 8


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


@dataclass
class DemoSummary:
    """All prompts together: speeds over the totals, the median per-prompt speedup, the pooled acceptance rate."""

    prompts: int
    identical: int
    new_tokens: int
    plain_tokens_per_second: float
    speculative_tokens_per_second: float
    median_speedup: float
    acceptance_rate: float

    @classmethod
    def of(cls, results: list[DemoResult]) -> "DemoSummary":
        return cls(
            prompts=len(results),
            identical=sum(r.identical for r in results),
            new_tokens=sum(len(r.speculative_tokens) for r in results),
            plain_tokens_per_second=sum(len(r.plain_tokens) for r in results) / sum(r.plain_seconds for r in results),
            speculative_tokens_per_second=sum(len(r.speculative_tokens) for r in results)
            / sum(r.speculative_seconds for r in results),
            median_speedup=statistics.median(r.speedup for r in results),
            acceptance_rate=acceptance_rate(
                sum(r.accepted_tokens for r in results), sum(r.drafted_tokens for r in results)
            ),
        )


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
    confidence_threshold: float = 0.0,
    lookup_tokens: int | None = None,
) -> list[DemoResult]:
    """Greedy-decodes each `(prompt_id, text)` plainly, then self-speculatively at `(exit_layer, num_speculations)`
    with drafts stopping below `confidence_threshold` and up to `lookup_tokens` looked up (`None`: the model's).

    One short unmeasured warm-up of both modes on the first prompt comes first. A difference at a logit gap of at
    most `tie_tolerance` (default by dtype, as `hf-layerskip correctness`) counts as a numerical tie. `on_result`
    sees each result as soon as it is measured (to show it while the next prompt decodes).
    """
    common = {}
    if tokenizer.pad_token_id is None and model.generation_config.pad_token_id is None:
        common["pad_token_id"] = tokenizer.eos_token_id
    plain = Strategy("plain")
    speculative = Strategy(
        "self_speculative", exit_layer, num_speculations, confidence_threshold, lookup_tokens=lookup_tokens
    )
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
        mismatch = find_mismatch(model, input_ids, result.plain_tokens, result.speculative_tokens, tie_tolerance)
        if mismatch is not None:
            result.mismatch_position, result.logit_gap = mismatch.position, mismatch.logit_gap
            result.is_tie = mismatch.is_tie
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
