"""Batched throughput: plain batched greedy decoding against batched self-speculative decoding and against a loop of
batch-1 self-speculative calls, timed on the same groups of prompts and interleaved so that machine drift cancels."""

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..modeling.self_speculative import acceptance_rate
from .metrics import PeakMemory, first_mismatch, format_cell, format_table, machine_description, memory_method

STRATEGIES = ("plain", "self_speculative", "self_speculative_loop")


@dataclass(frozen=True)
class Speculation:
    """The self-speculative settings: exit layer E, draft length d, confidence threshold t, lookup length (`None`:
    the model config's)."""

    exit_layer: int
    num_speculations: int
    confidence_threshold: float = 0.0
    lookup_tokens: int | None = None

    def generate_kwargs(self) -> dict:
        return dict(
            assistant_early_exit=self.exit_layer,
            num_assistant_tokens=self.num_speculations,
            assistant_confidence_threshold=self.confidence_threshold,
            prompt_lookup_num_tokens=self.lookup_tokens,
            return_dict_in_generate=True,
        )


@dataclass
class GroupRun:
    """One strategy's timed decoding of one group of prompts.

    `rows[i]` `(n_i,)` holds prompt i's new tokens up to and including its first EOS (all of them without one): the
    padding after a finished row is not counted. The draft counts (self-speculative only) are summed over the rows.
    """

    rows: list[torch.LongTensor]
    seconds: float
    peak_bytes: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.rows)


@dataclass
class ThroughputSummary:
    """One strategy at one batch size over all measured groups; rates are over totals."""

    batch_size: int
    strategy: str
    groups: int
    rows: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    # Tokens/s over plain's at the same batch size, and over plain's at batch size 1 (`None` when B=1 was not run).
    speedup_vs_plain: float
    speedup_vs_plain_batch_1: float | None
    acceptance_rate: float | None
    peak_memory_mib: float | None
    # Rows whose new tokens differ from plain batched greedy decoding's at the same batch size (0 expected in float32).
    mismatches: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThroughputResult:
    summaries: list[ThroughputSummary]
    machine: dict
    settings: dict
    groups: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "results": [s.to_dict() for s in self.summaries],
            "groups": self.groups,
        }


def left_pad(encoded: list[torch.LongTensor], pad_token_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompts `encoded[i]` `(1, length_i)` as one left-padded batch: `(input_ids, attention_mask)`, each
    `(len(encoded), max length)`, the mask 0 on the padding."""
    length = max(ids.shape[1] for ids in encoded)
    input_ids = encoded[0].new_full((len(encoded), length), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, length - ids.shape[1] :] = ids[0]
        attention_mask[row, length - ids.shape[1] :] = 1
    return input_ids, attention_mask


def consecutive_groups(items: list, size: int) -> list[list]:
    """`items` in consecutive groups of `size`; the last one may be smaller."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def interleaved_schedule(num_prompts: int, batch_sizes: list[int]) -> list[tuple[int, int, int]]:
    """`(batch_size, group index, first prompt)` of every group of consecutive prompts, in the order of their first
    prompt: all batch sizes move through the prompts together, so a drift of the machine reaches them alike."""
    groups = [(size, index, first) for size in batch_sizes for index, first in enumerate(range(0, num_prompts, size))]
    return sorted(groups, key=lambda group: (group[2], group[0]))


def eos_token_ids(generation_config) -> tuple[int, ...]:
    """The ids `generate` stops a row at, from a generation config's `eos_token_id` (None, an int or a list)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def cut_at_eos(new_tokens: torch.LongTensor, eos_ids: tuple[int, ...]) -> torch.LongTensor:
    """A row's new tokens `(n,)` up to and including its first EOS, or all of them without one: what follows an EOS
    in a batch is padding."""
    ends = torch.isin(new_tokens, torch.tensor(eos_ids, dtype=new_tokens.dtype)).nonzero()
    return new_tokens[: int(ends[0]) + 1] if len(ends) else new_tokens


def resolve_pad_token_id(generation_config, tokenizer) -> int:
    """The generation config's pad id, else the tokenizer's, else the first EOS id, else 0: padding only ever sits
    under a 0 of the attention mask or after a row's EOS, so any id is exact."""
    for candidate in (generation_config.pad_token_id, tokenizer.pad_token_id, *eos_token_ids(generation_config)):
        if candidate is not None:
            return candidate
    return 0


class GroupDecoder:
    """Decodes a group of prompts with any of `STRATEGIES`, greedily, timing all of the group's calls together."""

    def __init__(self, model, max_new_tokens: int, speculation: Speculation, pad_token_id: int):
        self.model = model
        self.speculation = speculation
        self.eos_ids = eos_token_ids(model.generation_config)
        self.kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
        self.pad_token_id = pad_token_id

    def _synchronize(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def run(self, strategy: str, group: list[torch.LongTensor]) -> GroupRun:
        """Decodes `group` (prompts `(1, length_i)`) with `strategy`; the rows come back in the group's order."""
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; choose from {STRATEGIES}.")
        speculative = strategy != "plain"
        kwargs = {**self.kwargs, **(self.speculation.generate_kwargs() if speculative else {})}
        calls = [[prompt] for prompt in group] if strategy == "self_speculative_loop" else [group]
        batches = [left_pad(call, self.pad_token_id) for call in calls]  # padded before the clock starts
        with PeakMemory(self.model.device) as memory:
            self._synchronize()
            start = time.perf_counter()
            outputs = [self.model.generate(ids, attention_mask=mask, **kwargs) for ids, mask in batches]
            self._synchronize()
            seconds = time.perf_counter() - start

        run = GroupRun([], seconds, memory.peak_bytes)
        for (input_ids, _), output in zip(batches, outputs):
            sequences = output.sequences if speculative else output  # (rows, prompt length + n)
            run.rows += [cut_at_eos(row, self.eos_ids) for row in sequences[:, input_ids.shape[1] :].cpu()]
        if speculative:
            # The outputs count per row, `(rows,)`.
            run.drafted_tokens = sum(int(output.drafted_tokens.sum()) for output in outputs)
            run.accepted_tokens = sum(int(output.accepted_tokens.sum()) for output in outputs)
        return run


def median_run(group_runs: list[GroupRun]) -> GroupRun:
    """The run of median seconds (the upper one of an even count)."""
    return sorted(group_runs, key=lambda run: run.seconds)[len(group_runs) // 2]


def differing_rows(plain: GroupRun, run: GroupRun) -> int:
    """How many of `run`'s rows differ from plain's row of the same prompt, token for token up to the row's end."""
    return sum(first_mismatch(expected, actual) is not None for expected, actual in zip(plain.rows, run.rows))


def _tokens_per_s(group_runs: list[GroupRun]) -> float:
    return sum(r.new_tokens for r in group_runs) / sum(r.seconds for r in group_runs)


def summarize_throughput(runs: dict[tuple[int, str], list[GroupRun]]) -> list[ThroughputSummary]:
    """One summary per `(batch_size, strategy)` key of `runs`, by batch size then strategy. Each key's groups are
    aligned with plain's at the same batch size, which must be among the keys."""
    tokens_per_s = {key: _tokens_per_s(group_runs) for key, group_runs in runs.items()}
    summaries = []
    for batch_size, strategy in sorted(runs, key=lambda key: (key[0], STRATEGIES.index(key[1]))):
        group_runs, plain_runs = runs[batch_size, strategy], runs[batch_size, "plain"]
        rate = tokens_per_s[batch_size, strategy]
        plain_batch_1 = tokens_per_s.get((1, "plain"))
        peaks = [r.peak_bytes for r in group_runs if r.peak_bytes is not None]
        speculative = strategy != "plain"
        accepted = sum(r.accepted_tokens for r in group_runs) if speculative else None
        drafted = sum(r.drafted_tokens for r in group_runs) if speculative else None
        summaries.append(
            ThroughputSummary(
                batch_size=batch_size,
                strategy=strategy,
                groups=len(group_runs),
                rows=sum(len(r.rows) for r in group_runs),
                new_tokens=sum(r.new_tokens for r in group_runs),
                seconds=sum(r.seconds for r in group_runs),
                tokens_per_s=rate,
                speedup_vs_plain=rate / tokens_per_s[batch_size, "plain"],
                speedup_vs_plain_batch_1=rate / plain_batch_1 if plain_batch_1 else None,
                acceptance_rate=acceptance_rate(accepted, drafted) if speculative else None,
                peak_memory_mib=max(peaks) / 2**20 if peaks else None,
                mismatches=sum(differing_rows(p, r) for p, r in zip(plain_runs, group_runs)),
            )
        )
    return summaries


def run_throughput(
    model,
    encoded: list[torch.LongTensor],
    batch_sizes: list[int],
    max_new_tokens: int,
    speculation: Speculation,
    pad_token_id: int,
    warmup: int = 1,
    progress: bool = True,
    repeats: int = 1,
) -> ThroughputResult:
    """Decodes the prompts `encoded[i]` `(1, length_i)` in consecutive groups of each batch size with every strategy.

    Before measuring, the first `warmup` groups of the smallest batch size run once with every strategy, unmeasured.
    The groups of all batch sizes run in the order of their first prompt (`interleaved_schedule`); on group g of a
    batch size the strategy order is rotated by g, so no strategy always runs first. Each group runs `repeats` times
    with every strategy in turn, and each strategy's run of median seconds counts: one slow moment of the machine
    does not decide a group.
    """
    batch_sizes = sorted(set(batch_sizes))
    decoder = GroupDecoder(model, max_new_tokens, speculation, pad_token_id)
    warmup_groups = consecutive_groups(encoded, batch_sizes[0])[:warmup]
    for group in tqdm(warmup_groups, desc="warm-up", disable=not progress or not warmup_groups):
        for strategy in STRATEGIES:
            decoder.run(strategy, group)

    runs: dict[tuple[int, str], list[GroupRun]] = {}
    schedule = interleaved_schedule(len(encoded), batch_sizes)
    for batch_size, index, first in tqdm(schedule, desc="throughput", disable=not progress):
        shift = index % len(STRATEGIES)
        repeated: dict[str, list[GroupRun]] = {}
        for _ in range(repeats):
            for strategy in STRATEGIES[shift:] + STRATEGIES[:shift]:
                repeated.setdefault(strategy, []).append(decoder.run(strategy, encoded[first : first + batch_size]))
        for strategy, group_runs in repeated.items():
            runs.setdefault((batch_size, strategy), []).append(median_run(group_runs))

    groups = []
    for (batch_size, strategy), group_runs in runs.items():
        for index, (run, plain) in enumerate(zip(group_runs, runs[batch_size, "plain"])):
            groups.append(
                {
                    "batch_size": batch_size,
                    "strategy": strategy,
                    "first_prompt": index * batch_size,
                    "new_tokens": [len(row) for row in run.rows],
                    "seconds": run.seconds,
                    "peak_memory_mib": run.peak_bytes / 2**20 if run.peak_bytes is not None else None,
                    "drafted_tokens": run.drafted_tokens,
                    "accepted_tokens": run.accepted_tokens,
                    "mismatches": differing_rows(plain, run),
                }
            )
    settings = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "dtype": str(model.dtype).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "prompts": len(encoded),
        "batch_sizes": batch_sizes,
        "strategies": list(STRATEGIES),
        **asdict(speculation),
        "warmup_groups": len(warmup_groups),
        "repeats": repeats,
        "pad_token_id": pad_token_id,
        "eos_token_ids": list(decoder.eos_ids),
        "memory_method": memory_method(model.device),
    }
    return ThroughputResult(summarize_throughput(runs), machine_description(model.device), settings, groups)


def throughput_table(summaries: list[ThroughputSummary]) -> str:
    """The markdown table, one row per (batch size, strategy)."""
    header = (
        "| B | strategy | new tokens | seconds | tok/s | × plain (same B) | × plain (B=1) | acceptance | peak mem MiB "
        "| mismatches |"
    )
    rows = [
        [
            str(s.batch_size),
            s.strategy,
            str(s.new_tokens),
            format_cell(s.seconds),
            format_cell(s.tokens_per_s, 1),
            format_cell(s.speedup_vs_plain),
            format_cell(s.speedup_vs_plain_batch_1),
            format_cell(s.acceptance_rate, 3),
            format_cell(s.peak_memory_mib, 1),
            f"{s.mismatches}/{s.rows}",
        ]
        for s in summaries
    ]
    return format_table(header, rows)
