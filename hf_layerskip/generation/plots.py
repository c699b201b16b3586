"""PNG plots of sweeps, layer-quality curves and batched throughput.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas: no display is needed, and the
global pyplot backend of the caller is left alone.
"""

import math
from pathlib import Path

from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .layer_quality import LayerQuality


def plot_speedup_heatmap(
    speedups: list[list[float]],
    exit_layers: list[int],
    num_speculations: list[int],
    path: str | Path,
    best: tuple[int, int] | None = None,
    title: str = "Self-speculative speedup over plain greedy decoding",
) -> Path:
    """Heatmap of `speedups[i][j]` at (E=exit_layers[i], d=num_speculations[j]); NaN cells stay blank.

    Each cell is annotated with its speedup; the `best` (E, d) is outlined.
    """
    figure = Figure(figsize=(2.5 + 0.9 * len(num_speculations), 1.5 + 0.5 * len(exit_layers)))
    axes = figure.subplots()
    # Diverging at 1.0: red cells are slower than plain decoding, green ones faster.
    low, high = _finite_range(speedups)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(low, 0.99), vmax=max(high, 1.01))
    image = axes.imshow(speedups, cmap="RdYlGn", norm=norm, aspect="auto")
    axes.set_xticks(range(len(num_speculations)), [str(d) for d in num_speculations])
    axes.set_yticks(range(len(exit_layers)), [str(e) for e in exit_layers])
    axes.set_xlabel("draft tokens per round d")
    axes.set_ylabel("exit layer E")
    axes.set_title(title, fontsize=10)
    for i, row in enumerate(speedups):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    if best is not None:
        i, j = exit_layers.index(best[0]), num_speculations.index(best[1])
        axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
    figure.colorbar(image, ax=axes, label="speedup (×)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def _finite_range(values: list[list[float]]) -> tuple[float, float]:
    finite = [v for row in values for v in row if not math.isnan(v)]
    return (min(finite), max(finite)) if finite else (1.0, 1.0)


def plot_layer_quality(
    curves: dict[str, list[LayerQuality]], path: str | Path, title: str = "Early-exit quality per layer"
) -> Path:
    """Top-1 agreement with the last layer and perplexity (log scale) against the exit layer, one line per label;
    triangles where the draft head (exit adapters, draft vocabulary) changes an exit's agreement."""
    figure = Figure(figsize=(11, 4))
    agreement_axes, perplexity_axes = figure.subplots(1, 2)
    for label, rows in curves.items():
        layers = [r.layer for r in rows]
        line = agreement_axes.plot(layers, [r.top1_agreement for r in rows], marker="o", markersize=3, label=label)
        # Markers only, at the exits the draft head moves by more than a draft vocabulary alone does: the others sit
        # on the plain curve, and a line through them would zigzag.
        drafted = [r for r in rows if r.draft is not None and abs(r.draft.top1_agreement - r.top1_agreement) > 0.01]
        if drafted:
            agreement_axes.plot(
                [r.layer for r in drafted],
                [r.draft.top1_agreement for r in drafted],
                linestyle="none",
                color=line[0].get_color(),
                marker="^",
                markersize=7,
                label=f"{label}, draft head",
            )
        perplexity_axes.plot(layers, [r.perplexity for r in rows], marker="o", markersize=3, label=label)
    agreement_axes.set(xlabel="exit layer", ylabel="top-1 agreement with last layer", ylim=(0, 1.02))
    perplexity_axes.set(xlabel="exit layer", ylabel="perplexity", yscale="log")
    for axes in (agreement_axes, perplexity_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def plot_throughput(
    tokens_per_s: dict[str, dict[int, float]],
    path: str | Path,
    title: str = "Greedy decoding throughput against batch size",
) -> Path:
    """Tokens/s `tokens_per_s[strategy][batch_size]` against the batch size (log 2 axis), one line per strategy."""
    figure = Figure(figsize=(6.5, 4))
    axes = figure.subplots()
    for strategy, by_batch_size in tokens_per_s.items():
        batch_sizes = sorted(by_batch_size)
        axes.plot(batch_sizes, [by_batch_size[b] for b in batch_sizes], marker="o", label=strategy)
    batch_sizes = sorted({b for by_batch_size in tokens_per_s.values() for b in by_batch_size})
    axes.set_xscale("log", base=2)
    axes.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes.set(xlabel="batch size B", ylabel="new tokens/s", ylim=(0, None))
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)
