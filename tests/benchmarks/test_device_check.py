"""The GPU check in its CPU form (`benchmarks/device_check.py --device cpu --tiny`), as CI keeps it working: the
table and the JSON it writes, every strategy in every cell, ours' greedy output equal to plain greedy's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"
MODELS, TARGETS, MODES, BATCH_SIZES = ("tiny-1b-like", "tiny-8b-like"), (0.5, 0.8), ("eager", "compiled"), (1, 8)
TRAINING = ("plain Trainer", "LayerSkip, no layer dropout", "LayerSkip, layer dropout p_max 0.5")
NOT_SUPPORTED = "not supported in this build"


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), str(out_dir), "--device", "cpu", "--tiny"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out_dir / "device_check.json").read_text()), (out_dir / "device_check.md").read_text()


def strategies(batch_size):
    return ("plain", "ours", "built-in") if batch_size == 1 else ("plain", "ours")


def test_every_cell_is_measured_or_refused_by_its_own_check(check):
    report, _ = check
    cells = {
        (row["model"], row["target_acceptance"], row["mode"], row["batch_size"], row["strategy"]): row
        for row in report["decoding"]
    }
    expected = {
        (model, target, mode, batch_size, strategy)
        for model in MODELS for target in TARGETS for mode in MODES for batch_size in BATCH_SIZES
        for strategy in strategies(batch_size)
    }  # fmt: skip
    assert set(cells) == expected and len(report["decoding"]) == len(expected)
    for key, row in cells.items():
        # Eager decoding and compiled plain decoding always run; a compiled strategy may refuse the static cache.
        allowed = {"ok"} if key[2] == "eager" or key[4] == "plain" else {"ok", NOT_SUPPORTED}
        assert row["status"] in allowed, (key, row)
        if row["status"] == "ok":
            assert row["tokens_per_s"] > 0 and row["speedup_over_plain"] > 0
            assert row["same_tokens_as_plain"] is True, key  # fp32 on the CPU: greedy is exact
        if row["status"] == "ok" and key[4] == "ours":
            assert 0 <= row["acceptance"] <= 1


def test_the_eager_cells_of_the_largest_batch_measure_the_calibrated_acceptance(check):
    report, _ = check
    calibrated = {(c["model"], c["target"]): c for c in report["calibration"]}
    assert set(calibrated) == {(model, target) for model in MODELS for target in TARGETS}
    for row in report["decoding"]:
        if (row["mode"], row["batch_size"], row["strategy"]) == ("eager", max(BATCH_SIZES), "ours"):
            calibration = calibrated[(row["model"], row["target_acceptance"])]
            assert row["scale_factor"] == calibration["factor"]
            assert row["acceptance"] == calibration["measured"]  # the same greedy run, deterministic


def test_training_steps_are_timed_for_every_setting(check):
    report, _ = check
    assert [record["setting"] for record in report["training"]] == list(TRAINING)
    for record in report["training"]:
        assert record["status"] == "ok" and record["median_step_s"] > 0
        assert record["recipe"].startswith("accelerate launch, FSDP2 recipe")  # the launch line the GPU runs
    rates = [record["mean_dropout_rate"] for record in report["training"]]
    assert rates[0] == rates[1] == 0 < rates[2]


def test_the_markdown_is_one_table_with_a_row_per_cell(check):
    report, text = check
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header, separator, *body = rows
    assert all(line.count("|") == header.count("|") == 11 for line in rows)
    assert set(separator) <= {"|", "-"}
    assert len(body) == len(report["decoding"]) + len(report["training"])
    assert sum(NOT_SUPPORTED in line for line in body) == sum(r["status"] != "ok" for r in report["decoding"])
