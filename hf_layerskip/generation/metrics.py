"""Measurements around generation: ROUGE-L, peak memory, greedy mismatches and per-strategy summaries."""

import math
import mmap
import os
import platform
import statistics
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..modeling.self_speculative import acceptance_rate
from .strategies import GenerationRecord, Strategy

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed words), with the `rouge-score` package."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def first_mismatch(expected: torch.LongTensor, actual: torch.LongTensor) -> int | None:
    """First position where two token sequences `(n,)`, `(m,)` differ (a length difference counts), or `None`."""
    common = min(len(expected), len(actual))
    differs = (expected[:common] != actual[:common]).nonzero()
    if len(differs):
        return int(differs[0])
    return None if len(expected) == len(actual) else common


def _read_status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_method(device: torch.device) -> str:
    """How `PeakMemory` measures on `device`: `cuda_max_allocated`, `rss_peak`, or `unavailable`."""
    if device.type == "cuda":
        return "cuda_max_allocated"
    if os.access(_CLEAR_REFS, os.W_OK) and _STATUS.is_file() and _rss_peak_sees_allocations():
        return "rss_peak"
    return "unavailable"


@lru_cache(maxsize=1)
def _rss_peak_sees_allocations(probe_bytes: int = 32 * 2**20) -> bool:
    """Whether VmHWM resets and then rises with a freed allocation; some sandboxes only accept the reset."""
    _CLEAR_REFS.write_text("5")
    resident = _read_status_kib("VmRSS") * 1024
    touch_fresh_pages(probe_bytes)
    return _read_status_kib("VmHWM") * 1024 >= resident + 0.9 * probe_bytes


def touch_fresh_pages(num_bytes: int) -> None:
    """Maps `num_bytes` of new anonymous memory, writes to every page, and unmaps it: a temporary allocation that
    the allocator cannot serve from memory the process already holds."""
    with mmap.mmap(-1, num_bytes) as memory:
        for offset in range(0, num_bytes, mmap.PAGESIZE):
            memory[offset] = 1


class PeakMemory:
    """Peak memory of the code run inside `with`, in bytes (`self.peak_bytes`; `None` when unavailable).

    Both are absolute (weights included), so strategies compare by their differences:

    - `cuda_max_allocated`: `torch.cuda.max_memory_allocated` after a reset on entry;
    - `rss_peak` (CPU, Linux): the process's peak resident set size during the call (VmHWM, reset to the current
      resident size on entry by writing 5 to `/proc/self/clear_refs`). It counts everything the process holds,
      including memory its allocator kept from earlier calls.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.method = memory_method(self.device)
        self.peak_bytes: int | None = None

    def __enter__(self):
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method == "rss_peak":
            _CLEAR_REFS.write_text("5")
        return self

    def __exit__(self, *exc_info):
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_peak":
            self.peak_bytes = _read_status_kib("VmHWM") * 1024
        return False


def machine_description(device: torch.device) -> dict:
    """What the figures were measured on."""
    device = torch.device(device)
    description = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpu_model = _cpu_model_name()
        if cpu_model:
            description["cpu_model"] = cpu_model
    return description


def _cpu_model_name() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


@dataclass
class StrategySummary:
    """One strategy over all measured prompts. Rates are over totals; `speedup` is plain's ms/token over this one's."""

    strategy: str
    kind: str
    exit_layer: int | None
    num_speculations: int | None
    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s_mean: float
    tokens_per_s_median: float
    ms_per_token: float
    speedup: float | None
    acceptance_rate: float | None
    tokens_per_round: float | None
    mean_accepted_per_round: float | None
    mean_draft_steps_per_round: float | None
    peak_memory_mib: float | None
    rouge_l: float | None
    mismatches: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    strategy: Strategy,
    records: list[GenerationRecord],
    plain_records: list[GenerationRecord],
    peak_bytes: list[int | None],
    rouge_scores: list[float],
    plain_ms_per_token: float | None,
) -> StrategySummary:
    """Aggregates one strategy's records (one per prompt, aligned with `plain_records`)."""
    new_tokens = sum(len(r.new_tokens) for r in records)
    seconds = sum(r.seconds for r in records)
    per_prompt_rates = [len(r.new_tokens) / r.seconds for r in records]
    ms_per_token = 1000 * seconds / max(new_tokens, 1)
    rounds = sum(r.rounds for r in records) if strategy.speculative else None
    drafted = sum(r.drafted_tokens for r in records) if strategy.speculative else None
    accepted = sum(r.accepted_tokens for r in records) if strategy.speculative else None
    measured_peaks = [b for b in peak_bytes if b is not None]
    return StrategySummary(
        strategy=strategy.name,
        kind=strategy.kind,
        exit_layer=strategy.exit_layer,
        num_speculations=strategy.num_speculations,
        prompts=len(records),
        new_tokens=new_tokens,
        seconds=seconds,
        tokens_per_s_mean=statistics.fmean(per_prompt_rates),
        tokens_per_s_median=statistics.median(per_prompt_rates),
        ms_per_token=ms_per_token,
        speedup=plain_ms_per_token / ms_per_token if plain_ms_per_token else None,
        acceptance_rate=acceptance_rate(accepted, drafted) if strategy.speculative else None,
        tokens_per_round=new_tokens / rounds if rounds else None,
        mean_accepted_per_round=accepted / rounds if rounds else None,
        # The built-in path drafts exactly its proposals; ours also runs the steps of withheld drafts.
        mean_draft_steps_per_round=(
            sum(r.draft_steps if r.draft_steps is not None else r.drafted_tokens for r in records) / rounds
            if rounds
            else None
        ),
        peak_memory_mib=max(measured_peaks) / 2**20 if measured_peaks else None,
        rouge_l=statistics.fmean(rouge_scores) if rouge_scores else None,
        mismatches=sum(first_mismatch(p.new_tokens, r.new_tokens) is not None for p, r in zip(plain_records, records)),
    )


def format_cell(value, digits: int = 2) -> str:
    """A table cell: "–" for a missing value, floats to `digits` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(header: str, rows: list[list[str]]) -> str:
    """A markdown table: the header line `| a | b |`, its separator, and one line per row of cells."""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def markdown_table(summaries: list[StrategySummary]) -> str:
    """The benchmark table, one row per strategy."""
    header = (
        "| strategy | tok/s mean | tok/s median | ms/token | speedup | acceptance | tokens/round | peak mem MiB "
        "| ROUGE-L | mismatches |"
    )
    rows = [
        [
            s.strategy,
            format_cell(s.tokens_per_s_mean),
            format_cell(s.tokens_per_s_median),
            format_cell(s.ms_per_token, 1),
            format_cell(s.speedup),
            format_cell(s.acceptance_rate, 3),
            format_cell(s.tokens_per_round),
            format_cell(s.peak_memory_mib, 1),
            format_cell(s.rouge_l, 3),
            f"{s.mismatches}/{s.prompts}",
        ]
        for s in summaries
    ]
    return format_table(header, rows)


@torch.inference_mode()
def reference_perplexity(model, tokenizer, examples) -> float:
    """Perplexity of the last layer on each example's reference given its prompt, pooled over reference tokens.

    `examples` are `PromptExample`s with a `reference` (HumanEval: the canonical solution after the problem). Only
    the reference's tokens are scored, each conditioned on the prompt and the reference tokens before it.
    """
    total_loss, total_tokens = 0.0, 0
    for example in examples:
        # Tokenised apart, so that the reference's tokens do not depend on a merge across the boundary.
        prompt_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]  # (1, prompt_length)
        reference_ids = tokenizer(example.reference, add_special_tokens=False, return_tensors="pt")["input_ids"]
        input_ids = torch.cat([prompt_ids, reference_ids], dim=1).to(model.device)  # (1, length)
        logits = model(input_ids).logits[0, prompt_ids.shape[1] - 1 : -1].float()  # (reference_length, vocab)
        total_loss += float(torch.nn.functional.cross_entropy(logits, reference_ids[0].to(model.device), reduction="sum"))
        total_tokens += reference_ids.shape[1]
    return math.exp(total_loss / total_tokens)
