"""The plots are valid PNG files that matplotlib can read back."""

import math

import matplotlib.image
import pytest

from hf_layerskip.generation.layer_quality import LayerQuality
from hf_layerskip.generation.plots import plot_layer_quality, plot_speedup_heatmap, plot_throughput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_heatmap_with_missing_cells(tmp_path):
    path = plot_speedup_heatmap([[1.2, math.nan], [0.8, 1.5]], [4, 8], [1, 2], tmp_path / "heat.png", best=(8, 2))
    assert_png(path)
    with pytest.raises(ValueError):
        plot_speedup_heatmap([[1.0]], [4], [1], tmp_path / "bad.png", best=(5, 1))


def test_layer_curves_overlay_two_models(tmp_path):
    before = [LayerQuality(n, 100.0 / n, n / 4, 50) for n in range(1, 5)]
    after = [LayerQuality(n, 20.0 / n, min(1.0, n / 3), 50) for n in range(1, 5)]
    assert_png(plot_layer_quality({"before": before, "after": after}, tmp_path / "layers.png"))


def test_layer_curves_mark_the_exits_the_draft_head_moves(tmp_path):
    from hf_layerskip.generation.layer_quality import ExitAgreement

    def draft(agreeing: int) -> ExitAgreement:
        return ExitAgreement(positions=100, agreeing=agreeing)

    rows = [LayerQuality(n, 10.0, 0.1, 100, draft(50 if n == 2 else 10)) for n in range(1, 4)]
    rows.append(LayerQuality(4, 2.0, 1.0, 100))
    path = plot_layer_quality({"model": rows}, tmp_path / "layers.png")
    assert_png(path)


def test_throughput_lines_one_per_strategy(tmp_path):
    tokens_per_s = {"plain": {1: 30.0, 2: 55.0, 4: 90.0}, "self_speculative": {1: 40.0, 2: 60.0, 4: 80.0}}
    assert_png(plot_throughput(tokens_per_s, tmp_path / "throughput.png"))
