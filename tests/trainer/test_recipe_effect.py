"""The recipe works: a tiny byte-level model trained from scratch on standard-library Python with
hf_layerskip/recipes/pretraining_from_scratch.yaml has early exits that agree with its last layer far more often than the same
model trained plainly, at a last-layer loss within 10% of the plain run's. (benchmarks/recipe_effect.py, smaller.)"""

import importlib.util
from pathlib import Path


BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "recipe_effect.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("recipe_effect", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layerskip_recipe_aligns_early_exits_at_little_cost_to_the_last_layer(one_thread):
    bench = load_benchmark()
    setup = bench.Setup(hidden_size=64, batch_size=8, max_steps=200, train_bytes=1_000_000, heldout_sequences=48)
    reports = bench.compare(setup, {"layerskip": bench.recipe_arguments(bench.DEFAULT_RECIPE)})
    plain, layerskip = reports["plain"], reports["layerskip"]

    plain_disagreement = 1 - bench.mean_early_agreement(plain)
    layerskip_disagreement = 1 - bench.mean_early_agreement(layerskip)
    assert layerskip_disagreement < 0.6 * plain_disagreement, (plain.agreement, layerskip.agreement)
    assert all(ours > theirs for ours, theirs in zip(layerskip.agreement[:-1], plain.agreement[:-1]))
    assert layerskip.loss[-1] <= 1.10 * plain.loss[-1], (plain.loss, layerskip.loss)
