"""A resumable grid of self-speculative settings (E × d × confidence threshold × draft vocabulary size × lookup
length), each timed against plain greedy decoding.

Everything lives in one output folder, so a killed sweep continues where it stopped:

- `settings.json`: what the sweep measures (model, prompts, lengths); a rerun must ask for the same;
- `plain.csv`: one row per prompt with plain decoding's time and tokens (the cached baseline);
- `sweep.csv`: one row per finished cell, appended as soon as the cell is done.

Every cell's speedup is over the cached baseline, unless the sweep is `paired`: then each cell times plain decoding
again, prompt by prompt between its own runs, so that machine drift between cells cancels (at twice the cost).
"""

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling.self_speculative import acceptance_rate
from .metrics import first_mismatch
from .strategies import Strategy, StrategyRunner

PLAIN_FIELDS = ("prompt_id", "new_tokens", "seconds", "tokens")


@dataclass
class SweepCell:
    """One cell over all prompts; `speedup` is `plain_ms_per_token` over this cell's `ms_per_token`.
    `draft_vocab_size` 0 means the model's whole draft vocabulary (or the full vocabulary when it has none);
    `lookup_tokens` 0 means no lookup drafting."""

    exit_layer: int
    num_speculations: int
    confidence_threshold: float
    draft_vocab_size: int
    lookup_tokens: int
    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    ms_per_token: float
    plain_ms_per_token: float
    speedup: float
    acceptance_rate: float
    tokens_per_round: float
    mismatches: int

    @classmethod
    def from_row(cls, row: dict) -> "SweepCell":
        # Every field is an int or a float; rows of sweeps from before thresholds, draft vocabularies and lookup
        # drafting lack them.
        defaults = {"confidence_threshold": 0.0, "draft_vocab_size": 0, "lookup_tokens": 0}
        return cls(**{f.name: f.type(row.get(f.name, defaults.get(f.name))) for f in fields(cls)})

    @property
    def key(self) -> "CellKey":
        return (self.exit_layer, self.num_speculations, self.confidence_threshold, self.draft_vocab_size, self.lookup_tokens)

    @property
    def strategy(self) -> Strategy:
        return cell_strategy(self.key)


CELL_FIELDS = tuple(f.name for f in fields(SweepCell))


@dataclass
class SweepFiles:
    directory: Path

    @property
    def settings(self) -> Path:
        return self.directory / "settings.json"

    @property
    def plain(self) -> Path:
        return self.directory / "plain.csv"

    @property
    def cells(self) -> Path:
        return self.directory / "sweep.csv"

    @property
    def heatmap(self) -> Path:
        return self.directory / "speedup_heatmap.png"


def _append_row(path: Path, names: tuple[str, ...], row: dict) -> None:
    is_new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        if is_new:
            writer.writeheader()
        writer.writerow(row)
        file.flush()


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def read_cells(path: Path) -> list[SweepCell]:
    """The finished cells of a `sweep.csv`."""
    return [SweepCell.from_row(row) for row in _read_rows(path)]


def _check_settings(files: SweepFiles, settings: dict) -> None:
    """Writes `settings.json` for a new sweep; refuses to resume one that measured something else."""
    if files.settings.is_file():
        saved = json.loads(files.settings.read_text())
        if saved != settings:
            differing = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(
                f"{files.directory} holds a sweep with other settings (differing: {differing}); "
                "use another output folder, or the same settings to resume it."
            )
    else:
        files.settings.write_text(json.dumps(settings, indent=2))


@dataclass
class PlainBaseline:
    """Plain greedy decoding per prompt: new tokens `(n,)` and seconds."""

    tokens: list[torch.LongTensor]
    seconds: list[float]

    @property
    def ms_per_token(self) -> float:
        return 1000 * sum(self.seconds) / max(sum(len(t) for t in self.tokens), 1)


def _plain_baseline(runner, prompt_ids, encoded, max_new_tokens, files, progress) -> PlainBaseline:
    """Plain decoding of every prompt, timed once and cached in `plain.csv`."""
    cached = {row["prompt_id"]: row for row in _read_rows(files.plain)}
    tokens, seconds = [], []
    for prompt_id, input_ids in zip(tqdm(prompt_ids, desc="plain baseline", disable=not progress), encoded):
        if prompt_id not in cached:
            record = runner.run(Strategy("plain"), input_ids, max_new_tokens)
            row = {
                "prompt_id": prompt_id,
                "new_tokens": len(record.new_tokens),
                "seconds": record.seconds,
                "tokens": " ".join(str(t) for t in record.new_tokens.tolist()),
            }
            _append_row(files.plain, PLAIN_FIELDS, row)
            cached[prompt_id] = row
        row = cached[prompt_id]
        tokens.append(torch.tensor([int(t) for t in row["tokens"].split()], dtype=torch.long))
        seconds.append(float(row["seconds"]))
    return PlainBaseline(tokens, seconds)


# (E, d, confidence threshold, draft vocabulary size (0: all of it), lookup length (0: no lookup drafting))
CellKey = tuple[int, int, float, int, int]


def cell_strategy(key: CellKey) -> Strategy:
    exit_layer, speculations, threshold, vocab_size, lookup_tokens = key
    return Strategy("self_speculative", exit_layer, speculations, threshold, vocab_size or None, lookup_tokens)


@dataclass
class SweepResult:
    cells: list[SweepCell]  # every finished cell, earlier runs included, in grid order
    measured_now: list[CellKey]  # the cells this call measured
    pending: list[CellKey]  # cells still to do (when `max_cells` stopped the sweep)
    files: SweepFiles

    @property
    def best(self) -> SweepCell | None:
        """The fastest cell whose outputs all equal plain greedy decoding."""
        exact = [c for c in self.cells if c.mismatches == 0]
        return max(exact, key=lambda c: c.speedup) if exact else None


def sweep_grid(
    exit_layers: list[int],
    num_speculations: list[int],
    confidence_thresholds: list[float] = (0.0,),
    draft_vocab_sizes: list[int] = (0,),
    lookup_tokens: list[int] = (0,),
) -> list[CellKey]:
    """Every (E, d, threshold, K, lookup length) combination, in that nesting order."""
    return [
        (e, d, float(t), k, n)
        for e in exit_layers
        for d in num_speculations
        for t in confidence_thresholds
        for k in draft_vocab_sizes
        for n in lookup_tokens
    ]


def run_sweep(
    model,
    prompt_ids: list[str],
    encoded: list[torch.LongTensor],
    grid: list[CellKey],
    max_new_tokens: int,
    output_dir: str | Path,
    settings: dict,
    max_cells: int | None = None,
    paired: bool = False,
    warmup: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Measures every cell of `grid` (see `sweep_grid`) not yet in `output_dir/sweep.csv`, appending a row per
    finished cell.

    `encoded[i]` `(1, prompt_length)` is prompt `prompt_ids[i]`. `settings` describes the sweep (model, prompts,
    lengths, ...) and must equal the saved one to resume. `max_cells` stops after that many new cells. `paired`
    re-times plain decoding inside every cell, alternating with the cell's runs prompt by prompt.
    """
    files = SweepFiles(Path(output_dir))
    files.directory.mkdir(parents=True, exist_ok=True)
    _check_settings(files, settings)
    done = {c.key for c in read_cells(files.cells)}
    todo = [cell for cell in grid if cell not in done]
    now = todo[:max_cells] if max_cells is not None else todo

    runner = StrategyRunner(model)
    if warmup and now:
        runner.run(Strategy("plain"), encoded[0], max_new_tokens)
        runner.run(cell_strategy(now[0]), encoded[0], max_new_tokens)
    baseline = _plain_baseline(runner, prompt_ids, encoded, max_new_tokens, files, progress)

    for key in tqdm(now, desc="sweep cells", disable=not progress):
        strategy = cell_strategy(key)
        records, plain_seconds = [], []
        for input_ids in encoded:
            if paired:
                plain_seconds.append(runner.run(Strategy("plain"), input_ids, max_new_tokens).seconds)
            records.append(runner.run(strategy, input_ids, max_new_tokens))
        plain_ms_per_token = (
            1000 * sum(plain_seconds) / max(sum(len(t) for t in baseline.tokens), 1)
            if paired
            else baseline.ms_per_token
        )
        new_tokens = sum(len(r.new_tokens) for r in records)
        seconds = sum(r.seconds for r in records)
        ms_per_token = 1000 * seconds / max(new_tokens, 1)
        cell = SweepCell(
            *key,
            prompts=len(records),
            new_tokens=new_tokens,
            seconds=seconds,
            tokens_per_s=new_tokens / seconds,
            ms_per_token=ms_per_token,
            plain_ms_per_token=plain_ms_per_token,
            speedup=plain_ms_per_token / ms_per_token,
            acceptance_rate=acceptance_rate(
                sum(r.accepted_tokens for r in records), sum(r.drafted_tokens for r in records)
            ),
            tokens_per_round=new_tokens / max(sum(r.rounds for r in records), 1),
            mismatches=sum(first_mismatch(p, r.new_tokens) is not None for p, r in zip(baseline.tokens, records)),
        )
        _append_row(files.cells, CELL_FIELDS, asdict(cell))

    finished = {c.key: c for c in read_cells(files.cells)}
    return SweepResult(
        cells=[finished[cell] for cell in grid if cell in finished],
        measured_now=now,
        pending=[cell for cell in grid if cell not in finished],
        files=files,
    )


def speedup_grid(cells: list[SweepCell], exit_layers: list[int], num_speculations: list[int]) -> list[list[float]]:
    """The best speedup over thresholds and draft vocabulary sizes per (E, d),
    `[len(exit_layers)][len(num_speculations)]`, NaN where no cell is done."""
    best: dict[tuple[int, int], float] = {}
    for c in cells:
        pair = (c.exit_layer, c.num_speculations)
        best[pair] = max(best.get(pair, -math.inf), c.speedup)
    return [[best.get((e, d), math.nan) for d in num_speculations] for e in exit_layers]
