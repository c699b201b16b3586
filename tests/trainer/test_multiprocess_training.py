"""Two processes on CPU (gloo) under torchrun: identical layer-dropout masks and identical final weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import free_port

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.multiprocess
def test_two_ranks_draw_the_same_masks_and_end_with_identical_weights(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", str(WORKER), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["ddp"] == "DistributedDataParallel"
    assert rank0["batches"] != rank1["batches"], "both ranks saw the same data: not data-parallel"
    assert len(rank0["masks"]) == 3 and rank0["masks"] == rank1["masks"]
    # Some layer was skipped by the whole batch in some step: DDP had an unused parameter to tolerate.
    assert any(not any(layer) for step in rank0["masks"] for layer in step)
    assert rank0["final"] != rank0["initial"]
    assert rank0["final"] == rank1["final"]
