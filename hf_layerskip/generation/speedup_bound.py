"""The analytic speedup bound of self-speculative decoding, from step costs measured on this device.

With per-token acceptance α and d drafts per round, a round yields on average

    τ(α, d) = 1 + α + α² + … + α^d = (1 − α^{d+1}) / (1 − α)          (τ = d + 1 when α = 1)

tokens (the accepted drafts plus the full model's own token), and costs s draft steps through layers 0..E−1 and
the draft's exit, and one verification pass. Relative to plain decoding, whose step costs c_full,

    ideal speedup = τ(α, d) / ((s · c_draft + c_verify) / c_full),

where s = d for a constant draft length; with a confidence threshold, s is the measured mean number of draft steps
per round (the withheld drafts' steps included), and c_verify, timed after d drafts, is at most what such a round's
verification costs.

α is fitted to the measured mean number of accepted drafts per round (Σ_{i=1..d} α^i, a geometric model of
acceptance), so the ideal uses the acceptance actually observed; the measured speedup over it shows how much of
the ideal the implementation keeps (overheads: Python, cache bookkeeping, logits processing).
"""

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from ..modeling.self_speculative import SelfSpeculativeDecoder


def expected_tokens_per_round(acceptance: float, num_speculations: int) -> float:
    """τ(α, d) = (1 − α^{d+1}) / (1 − α): mean tokens per round under per-token acceptance α."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"Acceptance must be in [0, 1], got {acceptance!r}.")
    if acceptance == 1.0:
        return num_speculations + 1.0
    return (1 - acceptance ** (num_speculations + 1)) / (1 - acceptance)


def fit_acceptance(mean_accepted_per_round: float, num_speculations: int, tolerance: float = 1e-9) -> float:
    """The per-token α whose expected accepted drafts per round, Σ_{i=1..d} α^i, equal the measured mean."""
    if not 0.0 <= mean_accepted_per_round <= num_speculations:
        raise ValueError(
            f"Mean accepted drafts per round must be in [0, {num_speculations}], got {mean_accepted_per_round!r}."
        )
    low, high = 0.0, 1.0
    while high - low > tolerance:  # Σ α^i rises monotonically on [0, 1]
        middle = (low + high) / 2
        if expected_tokens_per_round(middle, num_speculations) - 1 < mean_accepted_per_round:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@dataclass
class StepCosts:
    """Median seconds of one plain decoding step, one draft step at E, and one verification pass of d drafts."""

    full: float
    draft: float
    verify: float


def _median_seconds(step, repeats: int, device: torch.device, setup=None) -> float:
    """Median seconds of `step()`; `setup()`, untimed, runs before each call."""
    timings = []
    for repeat in range(repeats + 1):  # the first call warms up
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


@torch.inference_mode()
def measure_step_costs(
    model, input_ids: torch.LongTensor, exit_layer: int, num_speculations: int, repeats: int = 20
) -> StepCosts:
    """Times the three steps after the prompt `input_ids` `(1, prompt_length)`, on the decoder's own code path.

    - full: the last prompt token through all layers, final norm and LM head (a plain greedy step);
    - draft: one `SelfSpeculativeDecoder.draft_step` (layers 0..E−1 and the draft's exit);
    - verify: `SelfSpeculativeDecoder.verify` of d drafted tokens (layers 0..E−1 on the last one, layers E..L−1 on
      d + 1 positions) and the full model's scores of those positions; the d drafts are made, untimed, before each.

    The cache is cropped back after each step, so every step sees the same context length.
    """
    prompt_length = input_ids.shape[1]
    config = GenerationConfig(
        assistant_early_exit=exit_layer,
        num_assistant_tokens=num_speculations,
        do_sample=False,
        max_length=prompt_length + num_speculations + 1,  # room for exactly d drafts
        prompt_lookup_num_tokens=0,  # the early exit's draft, whatever the model's lookup default
    )
    cache = DynamicCache(config=model.config)
    decoder = SelfSpeculativeDecoder(model, config, None, input_ids, cache, None)
    decoder.prefill()  # every layer holds the prompt but its last token
    decoder.open_slots(num_speculations + 1)
    last_token = input_ids[:, -1]  # (1,)
    num_drafted = []

    def full():
        model(input_ids=last_token[:, None], cache=cache, use_cache=True)
        decoder.rewind()

    def draft():
        decoder.draft_step(last_token)
        decoder.rewind()

    def draft_round():
        num_drafted[:] = [decoder.draft()[0]]

    def verify():
        model.exit_logits(decoder.verify(num_drafted[0])).float()
        decoder.rewind()

    device = input_ids.device
    return StepCosts(
        full=_median_seconds(full, repeats, device),
        draft=_median_seconds(draft, repeats, device),
        verify=_median_seconds(verify, repeats, device, setup=draft_round),
    )


@dataclass
class SpeedupBound:
    """The ideal speedup at the measured acceptance, and how much of it was measured."""

    exit_layer: int
    num_speculations: int
    fitted_acceptance: float
    expected_tokens_per_round: float
    draft_steps_per_round: float  # s
    draft_cost_ratio: float  # c_draft / c_full
    verify_cost_ratio: float  # c_verify / c_full
    ideal_speedup: float
    measured_speedup: float
    fraction_of_ideal: float

    def to_dict(self) -> dict:
        return asdict(self)


def speedup_bound(
    costs: StepCosts,
    exit_layer: int,
    num_speculations: int,
    mean_accepted_per_round: float,
    measured_speedup: float,
    mean_draft_steps_per_round: float | None = None,
) -> SpeedupBound:
    """Ideal speedup τ(α, d) / ((s·c_draft + c_verify) / c_full) with α fitted to the measured acceptance and s the
    mean draft steps per round (`None`: d)."""
    acceptance = fit_acceptance(min(mean_accepted_per_round, num_speculations), num_speculations)
    tokens_per_round = expected_tokens_per_round(acceptance, num_speculations)
    steps = num_speculations if mean_draft_steps_per_round is None else mean_draft_steps_per_round
    round_cost = (steps * costs.draft + costs.verify) / costs.full
    ideal = tokens_per_round / round_cost
    return SpeedupBound(
        exit_layer=exit_layer,
        num_speculations=num_speculations,
        fitted_acceptance=acceptance,
        expected_tokens_per_round=tokens_per_round,
        draft_steps_per_round=steps,
        draft_cost_ratio=costs.draft / costs.full,
        verify_cost_ratio=costs.verify / costs.full,
        ideal_speedup=ideal,
        measured_speedup=measured_speedup,
        fraction_of_ideal=measured_speedup / ideal,
    )
