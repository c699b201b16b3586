"""LayerSkip training: the early-exit loss, exit weights and curricula, the layer-dropout schedule, and
`LayerSkipTrainingArguments` / `LayerSkipTrainer` built on the Hugging Face `Trainer`."""

from .curriculum import FixedCurriculum, GradualCurriculum, NoCurriculum, RotationalCurriculum, build_curriculum
from .early_exit_loss import early_exit_loss, early_exit_loss_sums, next_token_targets
from .fsdp import load_sharded_checkpoint, save_sharded_checkpoint, shard_layerskip_model
from .layer_dropout_schedule import LayerDropoutSchedule, layer_dropout_generator
from .layer_weights import LAYER_WEIGHT_SHAPES, early_exit_layer_weights
from .trainer import LayerSkipTrainer, layerskip_base_model
from .training_args import LayerSkipRecipe, LayerSkipTrainingArguments, resolve_layerskip_recipe

__all__ = [
    "FixedCurriculum",
    "GradualCurriculum",
    "NoCurriculum",
    "RotationalCurriculum",
    "build_curriculum",
    "early_exit_loss",
    "early_exit_loss_sums",
    "next_token_targets",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "shard_layerskip_model",
    "LayerDropoutSchedule",
    "layer_dropout_generator",
    "LAYER_WEIGHT_SHAPES",
    "early_exit_layer_weights",
    "LayerSkipTrainer",
    "layerskip_base_model",
    "LayerSkipRecipe",
    "LayerSkipTrainingArguments",
    "resolve_layerskip_recipe",
]
