"""LayerSkip training under FSDP2 (`fully_shard` per decoder layer, then the root) on two gloo processes, against
one unsharded process, and resumed from a sharded checkpoint (`fsdp_worker.py` runs both sides)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import free_port

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_worker(*arguments: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run([sys.executable, *arguments], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def as_tensors(parameters: dict) -> dict:
    return {name: torch.tensor(values) for name, values in parameters.items()}


@pytest.mark.multiprocess
def test_sharded_layerskip_training_matches_one_process_and_resumes_exactly(tmp_path):
    run_worker(str(WORKER), str(tmp_path), "reference")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    run_worker(*torchrun, f"--master_port={free_port()}", str(WORKER), str(tmp_path), "sharded")
    reference = json.loads((tmp_path / "reference_rank0.json").read_text())
    rank0, rank1 = (json.loads((tmp_path / f"sharded_rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == 2 and rank0["sharded"] == "DTensor"

    # The same masks on both ranks, and the masks the reference drew for each half-batch.
    masks = rank0["masks"]  # step -> layer -> row
    assert masks == rank1["masks"] and masks == reference["masks"][::2] == reference["masks"][1::2]
    layers_run = [[any(rows) for rows in step] for step in masks]
    # The cases the sharding must survive: a layer skipped by every row (no all-gather on any rank), run on some
    # rows only, and run on all; and a layer never run before the checkpoint (no optimizer state saved for it)
    # but run after it.
    assert any(not run for step in layers_run for run in step)
    assert any(any(rows) and not all(rows) for step in masks for rows in step)
    assert any(all(rows) for step in masks for rows in step[1:])
    checkpoint_step = 5
    assert any(
        not any(step[layer] for step in layers_run[:checkpoint_step])
        and any(step[layer] for step in layers_run[checkpoint_step:])
        for layer in range(len(layers_run[0]))
    )

    # One process: the mean of the two half-batches' losses, the same gradients (averaged by the reduce-scatter).
    # Weights to 5e-5: AdamW's first steps move a weight by about lr = 1e-3 whatever its gradient's size, so a
    # rounding-level gradient difference can show at 1e-5 (seen: 1.4e-5 on a layer first trained at step 7), and
    # a wrong gradient shows at 1e-3.
    sharded_losses = torch.tensor([rank0["losses"], rank1["losses"]]).mean(dim=0)
    torch.testing.assert_close(sharded_losses, torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    final, reference_final = as_tensors(rank0["final"]), as_tensors(reference["final"])
    assert final.keys() == reference_final.keys()
    for name in final:
        torch.testing.assert_close(final[name], reference_final[name], rtol=0, atol=5e-5, msg=name)
    assert rank0["final"] == rank1["final"]
    assert reference["final"] != reference["initial"]

    # Resumed from the sharded checkpoint of step 5: the uninterrupted run's losses and weights, bit for bit.
    assert rank0["resumed_losses"] == rank0["losses"][checkpoint_step:]
    assert rank1["resumed_losses"] == rank1["losses"][checkpoint_step:]
    assert rank0["resumed_final"] == rank0["final"]
