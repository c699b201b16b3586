"""Greedy self-speculative decoding against plain greedy decoding, token for token."""

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..modeling.self_speculative import acceptance_rate
from .metrics import first_mismatch
from .strategies import Strategy, StrategyRunner

# Logit gaps at or under these count as numerical ties: a different summation order can flip such an argmax. In
# float32 an absolute gap; in half precision, units in the last place at the logit's magnitude (a bfloat16 logit near
# 20 is a multiple of 0.125, so verifying several positions at once can move it by a step of that size).
FLOAT32_TIE_TOLERANCE = 1e-3
HALF_PRECISION_TIE_ULPS = 2


@dataclass
class CorrectnessCheck:
    """One prompt at one (E, d). On a mismatch: its position among the new tokens and the full model's logit gap
    there between plain's token and the speculative one (`None` when one output simply ended sooner)."""

    prompt_id: str
    exit_layer: int
    num_speculations: int
    new_tokens: int
    acceptance_rate: float
    mismatch_position: int | None = None
    plain_token: int | None = None
    speculative_token: int | None = None
    logit_gap: float | None = None
    is_tie: bool | None = None

    @property
    def passed(self) -> bool:
        return self.mismatch_position is None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Mismatch:
    """Where a speculative output first differs from plain's: its new-token `position` and, when both outputs reach
    it, the two tokens and the full model's logit gap there between them (`None` when one output ended sooner)."""

    position: int
    plain_token: int | None = None
    speculative_token: int | None = None
    logit_gap: float | None = None
    is_tie: bool | None = None


def unit_in_last_place(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype`'s numbers at `magnitude` (e.g. 0.125 for bfloat16 in [16, 32))."""
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(abs(magnitude), info.tiny)))


def tie_tolerance_for(dtype: torch.dtype, tie_tolerance: float | None = None, logit_magnitude: float = 0.0) -> float:
    """`tie_tolerance`, or where it is `None` the default for `dtype`: `FLOAT32_TIE_TOLERANCE` in float32,
    `HALF_PRECISION_TIE_ULPS` units in the last place at `logit_magnitude` in bfloat16 and float16."""
    if tie_tolerance is not None:
        return tie_tolerance
    if dtype in (torch.bfloat16, torch.float16):
        return HALF_PRECISION_TIE_ULPS * unit_in_last_place(dtype, logit_magnitude)
    return FLOAT32_TIE_TOLERANCE


def find_mismatch(
    model,
    input_ids: torch.LongTensor,
    plain_tokens: torch.LongTensor,
    speculative_tokens: torch.LongTensor,
    tie_tolerance: float | None = None,
) -> Mismatch | None:
    """The first difference of `speculative_tokens` from `plain_tokens` (both `(num_new,)`, after `input_ids`
    `(1, prompt_length)`), or `None`; a logit gap of at most `tie_tolerance` (unset: by dtype, see
    `tie_tolerance_for`) counts as a numerical tie."""
    position = first_mismatch(plain_tokens, speculative_tokens)
    if position is None:
        return None
    mismatch = Mismatch(position)
    if position < min(len(plain_tokens), len(speculative_tokens)):
        mismatch.plain_token = int(plain_tokens[position])
        mismatch.speculative_token = int(speculative_tokens[position])
        logits = next_token_logits(model, input_ids, plain_tokens, position)
        mismatch.logit_gap = float(logits[mismatch.plain_token] - logits[mismatch.speculative_token])
        tolerance = tie_tolerance_for(model.dtype, tie_tolerance, float(logits[mismatch.plain_token]))
        mismatch.is_tie = abs(mismatch.logit_gap) <= tolerance
    return mismatch


@torch.inference_mode()
def next_token_logits(model, input_ids: torch.LongTensor, plain_tokens: torch.LongTensor, position: int) -> torch.Tensor:
    """The full model's logits `(vocab_size,)` (as float) for new-token `position`: one forward pass over the prompt
    `input_ids` `(1, prompt_length)` and plain's first `position` new tokens `plain_tokens` `(num_new,)`."""
    prefix = torch.cat([input_ids, plain_tokens[None, :position].to(input_ids.device)], dim=1)
    return model(input_ids=prefix, use_cache=False, logits_to_keep=1).logits[0, -1].float()


def logit_gap(
    model, input_ids: torch.LongTensor, plain_tokens: torch.LongTensor, position: int, other_token: int
) -> float:
    """Full-model logit of plain's token minus that of `other_token` at new-token `position` (see
    `next_token_logits`)."""
    logits = next_token_logits(model, input_ids, plain_tokens, position)
    return float(logits[int(plain_tokens[position])] - logits[other_token])


def check_correctness(
    model,
    prompt_ids: list[str],
    encoded: list[torch.LongTensor],
    pairs: list[tuple[int, int]],
    max_new_tokens: int,
    tie_tolerance: float | None = None,
    progress: bool = True,
) -> list[CorrectnessCheck]:
    """Decodes each prompt plainly once, then self-speculatively at every (E, d) in `pairs`, and compares."""
    runner = StrategyRunner(model)
    checks = []
    bar = tqdm(total=len(encoded) * len(pairs), desc="correctness", disable=not progress)
    for prompt_id, input_ids in zip(prompt_ids, encoded):
        plain = runner.run(Strategy("plain"), input_ids, max_new_tokens).new_tokens
        for exit_layer, speculations in pairs:
            record = runner.run(Strategy("self_speculative", exit_layer, speculations), input_ids, max_new_tokens)
            check = CorrectnessCheck(
                prompt_id,
                exit_layer,
                speculations,
                len(record.new_tokens),
                acceptance_rate(record.accepted_tokens, record.drafted_tokens),
            )
            mismatch = find_mismatch(model, input_ids, plain, record.new_tokens, tie_tolerance)
            if mismatch is not None:
                check.mismatch_position, check.plain_token = mismatch.position, mismatch.plain_token
                check.speculative_token, check.logit_gap = mismatch.speculative_token, mismatch.logit_gap
                check.is_tie = mismatch.is_tie
            checks.append(check)
            bar.update()
    bar.close()
    return checks
