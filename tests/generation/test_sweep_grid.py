"""The resumable sweep's bookkeeping, on a tiny model (the command itself is tested in tests/cli)."""

import math
from dataclasses import asdict

import pytest
import torch

from hf_layerskip.generation.sweep import SweepCell, read_cells, run_sweep, speedup_grid, sweep_grid

PROMPTS = [torch.tensor([[5, 17, 42, 9]]), torch.tensor([[100, 3, 8]])]
SETTINGS = {"model": "tiny", "max_new_tokens": 6}


def test_cells_round_trip_and_fill_the_grid(model, tmp_path):
    grid = sweep_grid([2, 4], [1, 3])
    result = run_sweep(model, ["a", "b"], PROMPTS, grid, 6, tmp_path, SETTINGS, warmup=False, progress=False)
    assert [c.key for c in result.cells] == [(2, 1, 0.0, 0, 0), (2, 3, 0.0, 0, 0), (4, 1, 0.0, 0, 0), (4, 3, 0.0, 0, 0)]
    assert read_cells(result.files.cells) == result.cells
    plain_rows = result.files.plain.read_text().splitlines()
    assert len(plain_rows) == 3  # header and one row per prompt
    for cell in result.cells:
        assert cell.mismatches == 0 and cell.new_tokens == 12 and cell.prompts == 2
        assert cell.tokens_per_s == pytest.approx(cell.new_tokens / cell.seconds)
    assert result.best == max(result.cells, key=lambda c: c.speedup)
    grid = speedup_grid(result.cells[:3], [2, 4], [1, 3])
    assert grid[0] == [result.cells[0].speedup, result.cells[1].speedup] and math.isnan(grid[1][1])


def test_other_settings_are_refused(model, tmp_path):
    grid = sweep_grid([2], [1])
    run_sweep(model, ["a"], PROMPTS[:1], grid, 6, tmp_path, SETTINGS, warmup=False, progress=False)
    with pytest.raises(ValueError, match=r"differing: \['max_new_tokens'\]"):
        run_sweep(model, ["a"], PROMPTS[:1], grid, 8, tmp_path, {**SETTINGS, "max_new_tokens": 8}, progress=False)


def test_best_skips_inexact_cells(tmp_path):
    from hf_layerskip.generation.sweep import SweepFiles, SweepResult

    fast_but_wrong = SweepCell(2, 1, 0.0, 0, 0, 1, 10, 1.0, 10.0, 100.0, 300.0, 3.0, 0.5, 1.5, 1)
    exact = SweepCell(4, 1, 0.5, 64, 4, 1, 10, 2.0, 5.0, 200.0, 300.0, 1.5, 0.5, 1.5, 0)
    result = SweepResult([fast_but_wrong, exact], [], [], SweepFiles(tmp_path))
    assert result.best == exact
    assert SweepCell.from_row({k: str(v) for k, v in asdict(exact).items()}) == exact


def test_thresholds_draft_vocabulary_sizes_and_lookup_lengths_are_cells_of_their_own(model, tmp_path):
    vocab = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))[:64]
    model.set_draft_head(draft_vocab=vocab)
    grid = sweep_grid([2], [2], [0.0, 0.5], [0, 16], [0, 3])
    result = run_sweep(model, ["a", "b"], PROMPTS, grid, 6, tmp_path, SETTINGS, warmup=False, progress=False)
    assert [c.key for c in result.cells] == grid
    assert all(c.mismatches == 0 for c in result.cells)
    assert result.cells[0].strategy.draft_vocab_size is None and result.cells[2].strategy.draft_vocab_size == 16
    assert result.cells[0].strategy.lookup_tokens == 0 and result.cells[1].strategy.lookup_tokens == 3
    # A sweep from before these columns reads as threshold 0 over the whole draft vocabulary, without lookup.
    added = ("confidence_threshold", "draft_vocab_size", "lookup_tokens")
    old_row = {k: str(v) for k, v in asdict(result.cells[0]).items() if k not in added}
    assert SweepCell.from_row(old_row) == result.cells[0]
