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
    tolerance = DEFAULT_TIE_TOLERANCE.get(model.dtype, 1e-1) if tie_tolerance is None else tie_tolerance
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
            position = first_mismatch(plain, record.new_tokens)
            if position is not None:
                check.mismatch_position = position
                both_long_enough = position < min(len(plain), len(record.new_tokens))
                if both_long_enough:
                    check.plain_token, check.speculative_token = int(plain[position]), int(record.new_tokens[position])
                    check.logit_gap = logit_gap(model, input_ids, plain, position, check.speculative_token)
                    check.is_tie = abs(check.logit_gap) <= tolerance
            checks.append(check)
            bar.update()
    bar.close()
    return checks
