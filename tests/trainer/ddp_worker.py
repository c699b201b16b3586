"""One rank of the two-process test: 3 LayerSkip steps of a tiny model under DDP (gloo), layer dropout on.

Writes `rank<N>.json` to the directory given as the first argument: a checksum of the final parameters, the
layer-dropout masks drawn, and a checksum of each batch this rank saw.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's tiny_model
from conftest import tiny_model  # noqa: E402
from trainer_helpers import token_dataset, training_args  # noqa: E402

import hf_layerskip.modeling.modeling_layerskip as modeling  # noqa: E402
from hf_layerskip.trainer import LayerSkipTrainer  # noqa: E402


def checksum(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RecordingTrainer(LayerSkipTrainer):
    batches = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.batches.append(checksum([inputs["input_ids"]]))
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out_dir: Path):
    drawn_masks = []
    sample_keep_masks = modeling.sample_keep_masks

    def recording_sample_keep_masks(*args, **kwargs):
        masks = sample_keep_masks(*args, **kwargs)
        drawn_masks.append(masks.int().tolist())
        return masks

    modeling.sample_keep_masks = recording_sample_keep_masks

    model = tiny_model()
    initial = checksum(model.parameters())
    args = training_args(
        out_dir / "run",
        ddp_backend="gloo",
        max_steps=3,
        per_device_train_batch_size=2,
        layer_dropout_max=0.6,
        layer_dropout_scale="uniform",
        early_exit_curriculum_period=2,
    )
    trainer = RecordingTrainer(model, args, train_dataset=token_dataset(24))
    trainer.train()
    rank = dist.get_rank()
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "ddp": type(trainer.model_wrapped).__name__,
        "initial": initial,
        "final": checksum(model.parameters()),
        "masks": drawn_masks,
        "batches": RecordingTrainer.batches,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    # Tear the group down before exit: gloo's threads left running at interpreter shutdown can abort the process.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
