"""LayerSkip training of a tiny model under FSDP2, one process per rank (gloo, CPU), or its one-process reference.

`python fsdp_worker.py OUT_DIR reference` (one process): the unsharded model; each step's loss is the mean of
`LayerSkipTrainer.compute_loss` over the two half-batches the two ranks see, each with the masks of the step's first
draw (what every rank draws), so its gradient is the one the sharded run averages over ranks.

`torchrun --nproc_per_node 2 fsdp_worker.py OUT_DIR sharded`: `shard_layerskip_model` (`fully_shard` on every
decoder layer, then on the root); `... OUT_DIR accelerate`: sharded as `accelerate launch` shards with the FSDP2
recipe (`hf_layerskip/recipes/accelerate_fsdp2.yaml`, read by accelerate's launcher). Then the same steps through
`LayerSkipTrainer.compute_loss` and the trainer's own optimizer. Halfway it saves a sharded checkpoint of the model
and the optimizer with `torch.distributed.checkpoint`, runs to the end, then builds a fresh model and optimizer,
loads the checkpoint and runs the second half again.

Each writes `<mode>_rank<N>.json`: per-step losses, the layer-dropout masks drawn, and the full parameters (a list
of floats per name) at the end of the run and of the resumed run (and, for the reference, at the start).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's tiny_model
from conftest import tiny_model  # noqa: E402
from trainer_helpers import token_dataset, training_args  # noqa: E402

import hf_layerskip.modeling.modeling_layerskip as modeling  # noqa: E402
from hf_layerskip.trainer import (  # noqa: E402
    LayerSkipTrainer,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    shard_layerskip_model,
)

RECIPE = Path(__file__).resolve().parents[2] / "hf_layerskip" / "recipes" / "accelerate_fsdp2.yaml"
STEPS, CHECKPOINT_STEP, ROWS_PER_RANK, WORLD_SIZE = 10, 5, 2, 2
DROPOUT = dict(layer_dropout_max=0.9, layer_dropout_scale="linear")  # rates 0, 0.18, ..., 0.9 over 6 layers


def batches():
    """Step -> rank -> `{input_ids, labels}` of `ROWS_PER_RANK` rows: each rank's share of the step's batch."""
    rows = token_dataset(STEPS * WORLD_SIZE * ROWS_PER_RANK, seq_len=12)
    ids = torch.stack([row["input_ids"] for row in rows]).view(STEPS, WORLD_SIZE, ROWS_PER_RANK, -1)
    return [[{"input_ids": part, "labels": part} for part in step] for step in ids]


def record_masks(drawn: list):
    draw = modeling.sample_keep_masks

    def recording(*args, **kwargs):
        masks = draw(*args, **kwargs)  # (num_layers, batch_size)
        drawn.append(masks.int().tolist())
        return masks

    modeling.sample_keep_masks = recording


def full_parameters(model) -> dict[str, list[float]]:
    """Every parameter gathered whole (an all-gather per sharded tensor, on every rank)."""
    full = {}
    for name, parameter in model.named_parameters():
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        full[name] = tensor.flatten().tolist()
    return full


def shard_as_accelerate_launch(model):
    """Shards `model` as `accelerate launch --config_file hf_layerskip/recipes/accelerate_fsdp2.yaml` would on GPUs:
    the recipe read by accelerate's own launcher into its FSDP plugin, then accelerate's FSDP2 preparation (which
    also carves out the embeddings and the final norm with the LM head). Full precision, for the comparison."""
    from types import SimpleNamespace

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from accelerate.utils.launch import prepare_multi_gpu_env

    launch = launch_command_parser().parse_args(["--config_file", str(RECIPE), "train.py"])
    environment = prepare_multi_gpu_env(_validate_launch_command(launch)[0])
    plugin_settings = {name: value for name, value in environment.items() if name.startswith("FSDP_")}
    os.environ.update(plugin_settings)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin_settings["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        device=torch.device("cpu"),
        parallelism_config=None,
        torch_device_mesh=None,
        is_main_process=dist.get_rank() == 0,
    )
    return fsdp2_prepare_model(accelerator, model)


SHARDINGS = {
    "reference": lambda model: model,
    "sharded": shard_layerskip_model,
    "accelerate": shard_as_accelerate_launch,
}


def build(out_dir: Path, mode: str, init_seed: int = 0):
    model = SHARDINGS[mode](tiny_model(init_seed).train())
    # Seed 1: the last layer is skipped by every row of every step before the checkpoint and trained after it.
    trainer = LayerSkipTrainer(model, training_args(out_dir / "run", max_steps=STEPS, seed=1, **DROPOUT))
    trainer.state.max_steps = STEPS
    return model, trainer, trainer.create_optimizer()


def train_steps(model, trainer, optimizer, first: int, last: int, rank_batches) -> list[float]:
    """Steps `first..last-1`; `rank_batches(step)` gives the half-batches whose mean loss this process trains on."""
    losses = []
    for step in range(first, last):
        trainer.state.global_step = step
        step_losses = []
        for batch in rank_batches(step):
            trainer._dropout_draw = (-1, 0)  # each half-batch draws the step's first masks, as every rank does
            step_losses.append(trainer.compute_loss(model, batch))
        loss = torch.stack(step_losses).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_reference(out_dir: Path):
    data, drawn = batches(), []
    record_masks(drawn)
    model, trainer, optimizer = build(out_dir, "reference")
    initial = full_parameters(model)
    losses = train_steps(model, trainer, optimizer, 0, STEPS, lambda step: data[step])
    report = {"losses": losses, "masks": drawn, "initial": initial, "final": full_parameters(model)}
    (out_dir / "reference_rank0.json").write_text(json.dumps(report))


def run_sharded(out_dir: Path, mode: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD_SIZE
    data, drawn = batches(), []
    record_masks(drawn)
    model, trainer, optimizer = build(out_dir, mode)
    own_half = lambda step: [data[step][rank]]  # noqa: E731
    checkpoint = out_dir / "checkpoint"

    losses = train_steps(model, trainer, optimizer, 0, CHECKPOINT_STEP, own_half)
    save_sharded_checkpoint(checkpoint, model, optimizer)
    losses += train_steps(model, trainer, optimizer, CHECKPOINT_STEP, STEPS, own_half)
    final = full_parameters(model)
    masks = list(drawn)

    # A different initialisation: the weights and the optimizer's moments must come from the checkpoint.
    resumed_model, resumed_trainer, resumed_optimizer = build(out_dir, mode, init_seed=1)
    load_sharded_checkpoint(checkpoint, resumed_model, resumed_optimizer)
    resumed_losses = train_steps(resumed_model, resumed_trainer, resumed_optimizer, CHECKPOINT_STEP, STEPS, own_half)
    report = {
        "world_size": dist.get_world_size(),
        "sharded": type(model.model.layers[0].self_attn.q_proj.weight).__name__,
        "losses": losses,
        "masks": masks,
        "final": final,
        "resumed_losses": resumed_losses,
        "resumed_final": full_parameters(resumed_model),
    }
    (out_dir / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    run_reference(out_dir) if mode == "reference" else run_sharded(out_dir, mode)
