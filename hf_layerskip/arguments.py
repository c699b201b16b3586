"""The LayerSkip config settings as options, each declared once: a dataclass field with its `help`.

`LayerSkipTrainingArguments` inherits `LayerSkipRecipeArguments`, and `hf-layerskip convert` parses
`LayerSkipConfigArguments`; `HfArgumentParser` turns either into `--name` / `--name-with-dashes` options. Every
field defaults to `None`, "the model config's value"; the help quotes that default from `LayerSkipLlamaConfig`,
where it is declared.
"""

from dataclasses import asdict, dataclass, field, fields

from .modeling.configuration_layerskip_llama import (
    EARLY_EXIT_CURRICULA,
    EARLY_EXIT_LAYER_WEIGHTINGS,
    LAYER_DROPOUT_SCALES,
    LayerSkipLlamaConfig,
)

_CONFIG_DEFAULTS = {f.name: f.default for f in fields(LayerSkipLlamaConfig)}


def _setting(name: str, help: str, **metadata):
    """A field for the config field `name`, `None` by default; its help ends with the config's default."""
    default = _CONFIG_DEFAULTS[name]
    shown = "" if default is None else f" ({default})"
    return field(
        default=None, metadata={"help": f"LayerSkip: {help} Unset: the model config's value{shown}.", **metadata}
    )


@dataclass
class LayerSkipRecipeArguments:
    """The training recipe's config settings: layer dropout, exit curriculum and exit-loss weights."""

    layer_dropout_max: float | None = _setting(
        "layer_dropout_max", "largest layer-dropout rate p_max, in [0, 1]; 0 turns layer dropout off."
    )
    layer_dropout_scale: str | None = _setting(
        "layer_dropout_scale",
        "how the dropout rate grows with depth l of L: exponential p_max·(2^(l/(L-1)) - 1), linear p_max·l/(L-1) "
        "or uniform p_max.",
        choices=list(LAYER_DROPOUT_SCALES),
    )
    layer_dropout_layers: list[int] | None = _setting(
        "layer_dropout_layers", "indices of the layers that may be dropped (unset in the config: all)."
    )
    early_exit_loss_scale: float | None = _setting(
        "early_exit_loss_scale",
        "e_scale, the weight of the early exits' losses relative to the last layer's before normalisation, in "
        "[0, 1]; 0 trains the last layer only.",
    )
    early_exit_layer_weighting: str | None = _setting(
        "early_exit_layer_weighting",
        "depth profile of the exit weights over depth d = l+1: uniform 1, linear d, cumulative d(d-1)/2 (the "
        "paper's sum_{i<=l} i; 0 for the first layer), sqrt, inverse 1/d, inverse_sqrt.",
        choices=list(EARLY_EXIT_LAYER_WEIGHTINGS),
    )
    early_exit_curriculum: str | None = _setting(
        "early_exit_curriculum",
        "which exits are trained each step: none (all of them), rotational (every R-th layer, shifted by one each "
        "step), gradual (switched on from the last layer towards the first) or fixed (the layers in "
        "early_exit_layers). The last layer is always trained.",
        choices=list(EARLY_EXIT_CURRICULA),
    )
    early_exit_curriculum_period: int | None = _setting(
        "early_exit_curriculum_period", "R of the rotational curriculum, >= 1."
    )
    early_exit_gradual_fraction: float | None = _setting(
        "early_exit_gradual_fraction",
        "fraction of max_steps after which the gradual curriculum has switched every exit on, in (0, 1].",
    )
    early_exit_layers: list[int] | None = _setting(
        "early_exit_layers",
        "layer indices (0-based; exit layer E is index E-1) whose exits the fixed curriculum trains.",
    )


@dataclass
class LayerSkipConfigArguments(LayerSkipRecipeArguments):
    """Every LayerSkip setting a checkpoint's config stores: the recipe plus the decoding defaults."""

    _argument_group_name = "LayerSkip settings (stored in the checkpoint's config)"

    exit_layer: int | None = _setting(
        "exit_layer",
        "default exit layer E for early exit and self-speculation, in [1, num_hidden_layers - 1] (unset in the "
        "config: num_hidden_layers // 4).",
    )
    num_speculations: int | None = _setting("num_speculations", "default draft tokens d per self-speculative round.")
    num_lookup_speculations: int | None = _setting(
        "num_lookup_speculations",
        "default tokens a self-speculative round drafts by lookup, where the sequence's last tokens occurred earlier "
        "in it (0: never).",
    )
    lookup_ngram_size: int | None = _setting("lookup_ngram_size", "longest n-gram lookup drafting matches.")
    dynamic_exit: bool | None = _setting(
        "dynamic_exit", "choose each round's draft exit among the exit layer and those with an exit adapter."
    )

    def given(self) -> dict:
        """The settings that were set, as `LayerSkipLlamaConfig` keyword arguments."""
        return {name: value for name, value in asdict(self).items() if value is not None}


RECIPE_FIELDS = tuple(f.name for f in fields(LayerSkipRecipeArguments))
