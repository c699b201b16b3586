"""Greedy self-speculative decoding against plain greedy decoding, token for token."""

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..modeling.self_speculative import acceptance_rate
from .metrics import first_mismatch
from .strategies import Strategy, StrategyRunner

# Logit gaps at or under these count as numerical ties: a different summation order can flip such an argmax.
DEFAULT_TIE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


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


def tie_tolerance_for(dtype: torch.dtype, tie_tolerance: float | None = None) -> float:
    """`tie_tolerance`, or where it is `None` the default for `dtype`."""
    return DEFAULT_TIE_TOLERANCE.get(dtype, 1e-1) if tie_tolerance is None else tie_tolerance


def find_mismatch(
    model,
    input_ids: torch.LongTensor,
    plain_tokens: torch.LongTensor,
    speculative_tokens: torch.LongTensor,
    tie_tolerance: float,
) -> Mismatch | None:
    """The first difference of `speculative_tokens` from `plain_tokens` (both `(num_new,)`, after `input_ids`
    `(1, prompt_length)`), or `None`; a logit gap of at most `tie_tolerance` counts as a numerical tie."""
    position = first_mismatch(plain_tokens, speculative_tokens)
    if position is None:
        return None
    mismatch = Mismatch(position)
    if position < min(len(plain_tokens), len(speculative_tokens)):
        mismatch.plain_token = int(plain_tokens[position])
        mismatch.speculative_token = int(speculative_tokens[position])
        mismatch.logit_gap = logit_gap(model, input_ids, plain_tokens, position, mismatch.speculative_token)
        mismatch.is_tie = abs(mismatch.logit_gap) <= tie_tolerance
    return mismatch


@torch.inference_mode()
def logit_gap(
    model, input_ids: torch.LongTensor, plain_tokens: torch.LongTensor, position: int, other_token: int
) -> float:
    """Full-model logit of plain's token minus that of `other_token` at new-token `position`.

    `input_ids` `(1, prompt_length)`; `plain_tokens` `(num_new,)`. One forward pass over the prompt and plain's
    first `position` new tokens.
    """
    prefix = torch.cat([input_ids, plain_tokens[None, :position].to(input_ids.device)], dim=1)
    logits = model(input_ids=prefix, use_cache=False, logits_to_keep=1).logits[0, -1].float()  # (vocab_size,)
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
    tolerance = tie_tolerance_for(model.dtype, tie_tolerance)
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
            mismatch = find_mismatch(model, input_ids, plain, record.new_tokens, tolerance)
            if mismatch is not None:
                check.mismatch_position, check.plain_token = mismatch.position, mismatch.plain_token
                check.speculative_token, check.logit_gap = mismatch.speculative_token, mismatch.logit_gap
                check.is_tie = mismatch.is_tie
            checks.append(check)
            bar.update()
    bar.close()
    return checks
