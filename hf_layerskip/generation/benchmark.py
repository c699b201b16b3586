"""Interleaved benchmark of decoding strategies: each prompt runs every strategy in turn, so machine drift cancels."""

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .data import PromptExample
from .metrics import PeakMemory, StrategySummary, first_mismatch, machine_description, memory_method, rouge_l, summarize
from .speedup_bound import SpeedupBound, measure_step_costs, speedup_bound
from .strategies import GenerationRecord, Strategy, StrategyRunner


@dataclass
class BenchmarkResult:
    summaries: list[StrategySummary]
    bounds: list[SpeedupBound]
    machine: dict
    settings: dict
    per_prompt: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "strategies": [s.to_dict() for s in self.summaries],
            "speedup_bounds": [b.to_dict() for b in self.bounds],
            "per_prompt": self.per_prompt,
        }


def run_benchmark(
    model,
    tokenizer,
    prompts: list[PromptExample],
    encoded: list[torch.LongTensor],
    strategies: list[Strategy],
    max_new_tokens: int,
    warmup: int = 1,
    cost_repeats: int = 20,
    progress: bool = True,
) -> BenchmarkResult:
    """Greedy-decodes every prompt with every strategy and summarises them against plain decoding.

    `encoded[i]` `(1, prompt_length)` is `prompts[i]` tokenized. The first `warmup` prompts are run once with every
    strategy beforehand, unmeasured. On prompt i the strategy order is rotated by i, so no strategy always runs
    first. For each self-speculative strategy, the step costs of the analytic bound are measured on the first prompt.
    """
    if not any(s.kind == "plain" for s in strategies):
        strategies = [Strategy("plain"), *strategies]
    runner = StrategyRunner(model)
    for input_ids in tqdm(encoded[:warmup], desc="warm-up", disable=not progress or not warmup):
        for strategy in strategies:
            runner.run(strategy, input_ids, max_new_tokens)

    records: dict[Strategy, list[GenerationRecord]] = {s: [] for s in strategies}
    peaks: dict[Strategy, list[int | None]] = {s: [] for s in strategies}
    for index, input_ids in enumerate(tqdm(encoded, desc="benchmark", disable=not progress)):
        shift = index % len(strategies)
        for strategy in strategies[shift:] + strategies[:shift]:
            with PeakMemory(model.device) as memory:
                record = runner.run(strategy, input_ids, max_new_tokens)
            records[strategy].append(record)
            peaks[strategy].append(memory.peak_bytes)

    plain = next(s for s in strategies if s.kind == "plain")
    plain_ms_per_token = (
        1000 * sum(r.seconds for r in records[plain]) / max(sum(len(r.new_tokens) for r in records[plain]), 1)
    )
    summaries, per_prompt = [], [{"id": p.id, "prompt_tokens": int(x.shape[1])} for p, x in zip(prompts, encoded)]
    for strategy in strategies:
        rouge_scores = []
        for example, row, record, plain_record in zip(prompts, per_prompt, records[strategy], records[plain]):
            text = tokenizer.decode(record.new_tokens, skip_special_tokens=True)
            entry = {"new_tokens": len(record.new_tokens), "seconds": record.seconds, "text": text}
            if example.reference is not None:
                entry["rouge_l"] = rouge_l(text, example.reference)
                rouge_scores.append(entry["rouge_l"])
            entry["first_mismatch"] = first_mismatch(plain_record.new_tokens, record.new_tokens)
            row[strategy.name] = entry
        summaries.append(
            summarize(strategy, records[strategy], records[plain], peaks[strategy], rouge_scores, plain_ms_per_token)
        )

    bounds = []
    for strategy, summary in zip(strategies, summaries):
        if strategy.kind != "self_speculative":
            continue
        costs = measure_step_costs(model, encoded[0], strategy.exit_layer, strategy.num_speculations, cost_repeats)
        bounds.append(
            speedup_bound(
                costs,
                strategy.exit_layer,
                strategy.num_speculations,
                summary.mean_accepted_per_round,
                summary.speedup,
                summary.mean_draft_steps_per_round,
            )
        )

    settings = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "warmup_prompts": min(warmup, len(encoded)),
        "strategies": [s.name for s in strategies],
        "memory_method": memory_method(model.device),
    }
    return BenchmarkResult(summaries, bounds, machine_description(model.device), settings, per_prompt)


def bounds_table(bounds: list[SpeedupBound]) -> str:
    """The analytic-bound table, one row per self-speculative strategy."""
    lines = [
        "| E | d | fitted α | τ(α,d) | draft steps/round | c_draft/c_full | c_verify/c_full | ideal speedup "
        "| measured speedup | fraction |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in bounds:
        lines.append(
            f"| {b.exit_layer} | {b.num_speculations} | {b.fitted_acceptance:.3f} | {b.expected_tokens_per_round:.2f} "
            f"| {b.draft_steps_per_round:.2f} | {b.draft_cost_ratio:.3f} | {b.verify_cost_ratio:.3f} | {b.ideal_speedup:.2f} "
            f"| {b.measured_speedup:.2f} | {b.fraction_of_ideal:.2f} |"
        )
    return "\n".join(lines)
