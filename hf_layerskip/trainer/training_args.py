"""`LayerSkipTrainingArguments`: `TrainingArguments` plus the LayerSkip recipe's settings.

Every LayerSkip argument defaults to `None`, meaning "the model config's value"; the config's defaults are the
paper's continual-pretraining recipe (early-exit loss and layer dropout both on).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from ..arguments import RECIPE_FIELDS, LayerSkipRecipeArguments
from ..modeling.configuration_layerskip_llama import (
    EARLY_EXIT_CURRICULA,
    EARLY_EXIT_LAYER_WEIGHTINGS,
    LAYER_DROPOUT_SCALES,
    _check_choice,
    _check_range,
)
from .curriculum import EarlyExitCurriculum, build_curriculum
from .layer_dropout_schedule import LAYER_DROPOUT_TIME_CURRICULA, LayerDropoutSchedule
from .layer_weights import early_exit_layer_weights


@dataclass
class LayerSkipTrainingArguments(LayerSkipRecipeArguments, TrainingArguments):
    """`TrainingArguments` plus the LayerSkip settings (`LayerSkipRecipeArguments`: `None` means "from the model
    config") and the training-only ones below. `TrainingArguments`' fields come first, so its positional order
    (`output_dir`) is kept."""

    _argument_group_name = "training (transformers.TrainingArguments and the LayerSkip: options)"

    layer_dropout_time_curriculum: str = field(
        default="constant",
        metadata={
            "help": "LayerSkip: how the dropout rates grow over training: constant (S(t)=1, the paper's choice for "
            "continual pretraining and fine-tuning) or exponential (S(t)=2^(t/T)-1, for pretraining from scratch).",
            "choices": list(LAYER_DROPOUT_TIME_CURRICULA),
        },
    )
    distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "LayerSkip: α in [0, 1]; each trained exit's loss becomes (1 - α)·cross-entropy + α·KL(teacher ‖ "
            "exit), the teacher being the same model with its PEFT adapters disabled (no second copy; LoRA only). "
            "Trains the exits towards what the original model would say and holds the last layer to it."
        },
    )
    early_exit_loss_chunk_size: int = field(
        default=2048,
        metadata={
            "help": "LayerSkip: the most token rows projected through the LM head at once, per exit; the logits of one "
            "chunk take chunk_size × vocab_size × 4 bytes (400 MB for 2048 rows and a 49k vocabulary)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.early_exit_loss_chunk_size < 1:
            raise ValueError(f"`early_exit_loss_chunk_size` must be >= 1, got {self.early_exit_loss_chunk_size!r}.")
        _check_range("distillation_weight", self.distillation_weight, 0.0, 1.0)

    def layerskip_recipe(self, config) -> "LayerSkipRecipe":
        """The settings in force for a model with `config`: each argument, or the config's value where `None`."""
        return resolve_layerskip_recipe(self, config)


# The arguments LayerSkipTrainingArguments adds to TrainingArguments.
LAYERSKIP_ARGUMENT_NAMES = tuple(
    f.name for f in fields(LayerSkipTrainingArguments) if f.name not in {g.name for g in fields(TrainingArguments)}
)


@dataclass(frozen=True)
class LayerSkipRecipe:
    """The resolved LayerSkip settings of a training run: layer dropout, exit curriculum and exit weights."""

    num_layers: int
    layer_dropout: LayerDropoutSchedule
    curriculum: EarlyExitCurriculum
    layer_weighting: str
    loss_scale: float
    loss_chunk_size: int
    distillation_weight: float = 0.0

    def exits(self, step: int, max_steps: int) -> tuple[list[int], torch.Tensor]:
        """`(layers, weights (len(layers),))`: the exits trained at `step`, those with weight 0 left out."""
        layers = self.curriculum.active_layers(step, self.num_layers, max_steps)
        weights = early_exit_layer_weights(layers, self.num_layers, self.layer_weighting, self.loss_scale)
        kept = weights > 0
        return [layer for layer, keep in zip(layers, kept.tolist()) if keep], weights[kept]


def resolve_layerskip_recipe(args: TrainingArguments, config) -> LayerSkipRecipe:
    """`args`' LayerSkip settings over `config`'s (`args` may be a plain `TrainingArguments`)."""
    settings = {name: getattr(args, name, None) for name in RECIPE_FIELDS}
    settings = {name: getattr(config, name) if value is None else value for name, value in settings.items()}
    num_layers = config.num_hidden_layers
    _check_range("early_exit_loss_scale", settings["early_exit_loss_scale"], 0.0, 1.0)
    _check_choice("early_exit_layer_weighting", settings["early_exit_layer_weighting"], EARLY_EXIT_LAYER_WEIGHTINGS)
    _check_choice("layer_dropout_scale", settings["layer_dropout_scale"], LAYER_DROPOUT_SCALES)
    _check_range("layer_dropout_max", settings["layer_dropout_max"], 0.0, 1.0)
    _check_layers("layer_dropout_layers", settings["layer_dropout_layers"], num_layers)
    _check_choice("early_exit_curriculum", settings["early_exit_curriculum"], EARLY_EXIT_CURRICULA)
    _check_layers("early_exit_layers", settings["early_exit_layers"], num_layers)
    return LayerSkipRecipe(
        num_layers=num_layers,
        layer_dropout=LayerDropoutSchedule(
            num_layers,
            settings["layer_dropout_max"],
            settings["layer_dropout_scale"],
            settings["layer_dropout_layers"],
            getattr(args, "layer_dropout_time_curriculum", "constant"),
        ),
        curriculum=build_curriculum(
            settings["early_exit_curriculum"],
            settings["early_exit_curriculum_period"],
            settings["early_exit_gradual_fraction"],
            settings["early_exit_layers"],
        ),
        layer_weighting=settings["early_exit_layer_weighting"],
        loss_scale=settings["early_exit_loss_scale"],
        loss_chunk_size=getattr(args, "early_exit_loss_chunk_size", 2048),
        distillation_weight=getattr(args, "distillation_weight", 0.0),
    )


def _check_layers(name, layers: Sequence[int] | None, num_layers):
    for layer in layers or ():
        if not 0 <= layer < num_layers:
            raise ValueError(f"`{name}` must hold layer indices in [0, {num_layers - 1}], got {layer!r}.")
