"""The analytic speedup bound of self-speculative decoding, from step costs measured on this device.

With per-token acceptance α and d drafts per round, a round yields on average

    τ(α, d) = 1 + α + α² + … + α^d = (1 − α^{d+1}) / (1 − α)          (τ = d + 1 when α = 1)

tokens (the accepted drafts plus the full model's own token), and costs d draft steps through layers 0..E−1 and
one verification pass. Relative to plain decoding, whose step costs c_full,

    ideal speedup = τ(α, d) / ((d · c_draft + c_verify) / c_full).

α is fitted to the measured mean number of accepted drafts per round (Σ_{i=1..d} α^i, a geometric model of
acceptance), so the ideal uses the acceptance actually observed; the measured speedup over it shows how much of
the ideal the implementation keeps (overheads: Python, cache bookkeeping, logits processing).
"""

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import DynamicCache


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


def _median_seconds(step, repeats: int, device: torch.device) -> float:
    step()  # warm-up
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Crops every cache layer to its first `length` positions (layers may hold different lengths)."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)


@torch.inference_mode()
def measure_step_costs(
    model, input_ids: torch.LongTensor, exit_layer: int, num_speculations: int, repeats: int = 20
) -> StepCosts:
    """Times the three steps after the prompt `input_ids` `(1, prompt_length)` is in the cache.

    - full: one token through all layers, final norm and LM head (a plain greedy step);
    - draft: one token through layers 0..E−1 and the shared exit (norm and LM head);
    - verify: one token through layers 0..E−1, then d + 1 positions through layers E..L−1 and the exit.

    The cache is cropped back to the prompt after each step, so every step sees the same context length.
    """
    num_layers = model.config.num_hidden_layers
    prompt_length = input_ids.shape[1]
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, cache=cache, use_cache=True)
    token = input_ids[:, -1:]  # (1, 1)
    draft_hidden = model.model.embed_tokens(token).expand(1, num_speculations, -1)  # (1, d, hidden_size)

    def full():
        model(input_ids=token, cache=cache, use_cache=True)
        crop_cache(cache, prompt_length)

    def draft():
        model(input_ids=token, cache=cache, use_cache=True, exit_layer=exit_layer)
        crop_cache(cache, prompt_length)

    def verify():
        hidden = model.model.embed_tokens(token)  # (1, 1, hidden_size)
        positions = torch.arange(prompt_length, prompt_length + num_speculations + 1, device=token.device)[None]
        hidden = model.model.run_layers(hidden, 0, exit_layer, positions[:, -1:], None, cache)
        hidden = torch.cat([draft_hidden, hidden], dim=1)  # (1, d + 1, hidden_size)
        hidden = model.model.run_layers(hidden, exit_layer, num_layers, positions, None, cache)
        model.exit_logits(hidden).float()
        crop_cache(cache, prompt_length)

    device = input_ids.device
    return StepCosts(
        full=_median_seconds(full, repeats, device),
        draft=_median_seconds(draft, repeats, device),
        verify=_median_seconds(verify, repeats, device),
    )


@dataclass
class SpeedupBound:
    """The ideal speedup at the measured acceptance, and how much of it was measured."""

    exit_layer: int
    num_speculations: int
    fitted_acceptance: float
    expected_tokens_per_round: float
    draft_cost_ratio: float  # c_draft / c_full
    verify_cost_ratio: float  # c_verify / c_full
    ideal_speedup: float
    measured_speedup: float
    fraction_of_ideal: float

    def to_dict(self) -> dict:
        return asdict(self)


def speedup_bound(
    costs: StepCosts, exit_layer: int, num_speculations: int, mean_accepted_per_round: float, measured_speedup: float
) -> SpeedupBound:
    """Ideal speedup τ(α, d) / ((d·c_draft + c_verify) / c_full) with α fitted to the measured acceptance."""
    acceptance = fit_acceptance(min(mean_accepted_per_round, num_speculations), num_speculations)
    tokens_per_round = expected_tokens_per_round(acceptance, num_speculations)
    round_cost = (num_speculations * costs.draft + costs.verify) / costs.full
    ideal = tokens_per_round / round_cost
    return SpeedupBound(
        exit_layer=exit_layer,
        num_speculations=num_speculations,
        fitted_acceptance=acceptance,
        expected_tokens_per_round=tokens_per_round,
        draft_cost_ratio=costs.draft / costs.full,
        verify_cost_ratio=costs.verify / costs.full,
        ideal_speedup=ideal,
        measured_speedup=measured_speedup,
        fraction_of_ideal=measured_speedup / ideal,
    )
