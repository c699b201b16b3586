"""FSDP2 for LayerSkip training: sharding per decoder layer, and sharded checkpoints that survive skipped layers.

Layer dropout and FSDP2 agree because every rank draws the same keep masks (`layer_dropout_generator`): a layer
that no row of a step keeps is not called on any rank, so its all-gather and its reduce-scatter are skipped on all
of them alike, and its parameters get no gradient anywhere (as in one process). A layer that some rows keep runs on
every rank, on its own rows.

What needs care is the optimizer state: a parameter whose layer every step before a checkpoint skipped has none,
while a fresh optimizer's sharded state dict (`get_state_dict` initialises it for every parameter) asks for it.
`load_sharded_checkpoint` loads what was saved and leaves such parameters without state, as in the run that saved.
"""

from pathlib import Path

import torch
from torch import nn


def shard_layerskip_model(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """`fully_shard` on each decoder layer, then on the whole model (the root holds the embeddings, the final norm,
    the LM head and the draft head, which every exit shares). In place; returns `model`.

    For training without `accelerate launch` (`torchrun`, a process group already initialised). Accelerate's FSDP2
    plugin with `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` shards the layers alike (recent releases also give
    the embeddings, and the final norm with the LM head, units of their own); the tests train both layouts.
    `fully_shard_kwargs` (`mesh`, `mp_policy`, `reshard_after_forward`, ...) go to every call, except
    `reshard_after_forward` to the root, which keeps torch's default for a root (stay gathered from forward to
    backward, as accelerate does too): the early-exit loss uses the final norm and the LM head after the forward.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model, **{k: v for k, v in fully_shard_kwargs.items() if k != "reshard_after_forward"})
    return model


def save_sharded_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Saves the model's and the optimizer's sharded state with `torch.distributed.checkpoint`; call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads what `save_sharded_checkpoint` saved into `model` and `optimizer` (same sharding); call on every rank.

    Parameters that had no optimizer state when it was saved (their layer was skipped by every sample of every step
    so far) are left without state, so that the resumed run updates them as the uninterrupted run would.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved_keys = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    optimizer_state["state"] = {
        name: {key: value for key, value in state.items() if f"optimizer.state.{name}.{key}" in saved_keys}
        for name, state in optimizer_state["state"].items()
    }
    optimizer_state["state"] = {name: state for name, state in optimizer_state["state"].items() if state}
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    # Not strict: the parameters left out above have no state to load.
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
