"""LayerSkip training under FSDP2 on two gloo processes, sharded by `shard_layerskip_model` or as `accelerate launch`
shards with the FSDP2 recipe, against one unsharded process, and resumed from a sharded checkpoint
(`fsdp_worker.py` runs both sides)."""

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("fsdp_reference")
    run_worker(str(WORKER), str(out_dir), "reference")
    return json.loads((out_dir / "reference_rank0.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("sharding", ["sharded", "accelerate"])
def test_sharded_layerskip_training_matches_one_process_and_resumes_exactly(tmp_path, reference, sharding):
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    run_worker(*torchrun, f"--master_port={free_port()}", str(WORKER), str(tmp_path), sharding)
    rank0, rank1 = (json.loads((tmp_path / f"{sharding}_rank{rank}.json").read_text()) for rank in (0, 1))
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
    torch.testing.assert_close(sharded_losses, torch.tensor(reference["losses"]), rtol=1e-6, atol=0)
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


@pytest.mark.parametrize(
    ("recipe", "distributed_type"), [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp2.yaml", "FSDP")]
)
def test_accelerate_recipes_read_by_accelerate_launch(recipe, distributed_type):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from conftest import tiny_model

    path = Path(__file__).resolve().parents[2] / "hf_layerskip" / "recipes" / recipe
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x"]))
    assert defaults.distributed_type == distributed_type and args.mixed_precision == "bf16"
    if distributed_type == "FSDP":
        assert args.use_fsdp and args.fsdp_version == 2 and args.fsdp_state_dict_type == "SHARDED_STATE_DICT"
        # The class named for wrapping is the one our decoder layers are.
        assert args.fsdp_transformer_layer_cls_to_wrap == type(tiny_model().model.layers[0]).__name__
