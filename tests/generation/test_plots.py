"""The plots are valid PNG files that matplotlib can read back."""

import math

import matplotlib.image
import pytest

from hf_layerskip.generation.layer_quality import LayerQuality
from hf_layerskip.generation.plots import plot_layer_quality, plot_speedup_heatmap

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
