"""The LayerSkip settings (arXiv 2404.16710), mixed into each family's stock config.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and
same-folder modules.
"""

from dataclasses import dataclass

LAYER_DROPOUT_SCALES = ("exponential", "linear", "uniform")
EARLY_EXIT_LAYER_WEIGHTINGS = ("uniform", "linear", "cumulative", "sqrt", "inverse", "inverse_sqrt")
EARLY_EXIT_CURRICULA = ("none", "rotational", "gradual", "fixed")


def _check_range(name, value, low, high, *, low_inclusive=True, high_inclusive=True):
    below = value < low if low_inclusive else value <= low
    above = value > high if high_inclusive else value >= high
    if below or above:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


@dataclass(repr=False)
class LayerSkipConfigMixin:
    r"""
    The LayerSkip settings, mixed in before a stock config class (`class LayerSkipXConfig(LayerSkipConfigMixin,
    XConfig)` under `@strict`). Defaults follow the paper's continual-pretraining recipe.

    Args:
        layer_dropout_max (`float`, *optional*, defaults to 0.1):
            Largest layer-dropout rate `p_max`, reached by the last dropped layer. 0 disables layer dropout.
        layer_dropout_scale (`str`, *optional*, defaults to `"exponential"`):
            How the rate grows with depth `l` over `L` layers: `"exponential"` p_l = p_max·(2^(l/(L-1)) − 1),
            `"linear"` p_l = p_max·l/(L-1), `"uniform"` p_l = p_max.
        layer_dropout_layers (`list[int]`, *optional*):
            Indices of the layers that may be dropped; `None` means all of them.
        early_exit_loss_scale (`float`, *optional*, defaults to 0.1):
            `e_scale`: weight of the early-exit losses relative to the last layer's before normalisation.
        early_exit_layer_weighting (`str`, *optional*, defaults to `"cumulative"`):
            Per-layer weighting of the early-exit losses: one of `uniform`, `linear`, `cumulative` (the paper's
            Σ_{i≤l} i), `sqrt`, `inverse`, `inverse_sqrt`.
        early_exit_curriculum (`str`, *optional*, defaults to `"rotational"`):
            Which exits are trained at each step: `"none"` (all), `"rotational"` (every R-th layer, rotating each
            step), `"gradual"` (switched on from the last layer towards the first) or `"fixed"` (the exits in
            `early_exit_layers`, every step).
        early_exit_curriculum_period (`int`, *optional*, defaults to 8):
            `R` of the rotational curriculum.
        early_exit_gradual_fraction (`float`, *optional*, defaults to 0.5):
            Fraction of training over which the gradual curriculum switches all exits on.
        early_exit_layers (`list[int]`, *optional*):
            Layer indices whose exits the `"fixed"` curriculum trains (exit layer `E` is index `E − 1`), for a model
            meant to draft at those exits.
        exit_layer (`int`, *optional*):
            Default exit layer `E` for early exit and self-speculative decoding, in [1, num_hidden_layers − 1].
            Defaults to a quarter of the depth.
        num_speculations (`int`, *optional*, defaults to 6):
            Default number of draft tokens `d` per self-speculative round.
        num_lookup_speculations (`int`, *optional*, defaults to 0):
            Default number of tokens a self-speculative round drafts by lookup (`generate`'s
            `prompt_lookup_num_tokens` overrides it): when the sequence's last tokens occurred earlier in it, the
            round drafts what followed them, with no layer pass, instead of drafting with the early exit. 0 disables.
        lookup_ngram_size (`int`, *optional*, defaults to 2):
            Longest n-gram lookup drafting matches (`generate`'s `max_matching_ngram_size` overrides it); shorter
            ones down to a single token are tried when it does not occur.
        dynamic_exit (`bool`, *optional*, defaults to `False`):
            Self-speculative decoding chooses each round's draft exit among `assistant_early_exit` and the layers
            with an exit adapter, by the speed each has measured so far in the call (see `dynamic_drafting.py`).
        exit_adapter_layers (`list[int]`, *optional*):
            Exit layers `E` (as `assistant_early_exit` counts them) that have an exit adapter: a small residual map
            applied to the draft's hidden state before the shared norm and LM head (see `draft_head.py`).
        exit_adapter_rank (`int`, *optional*):
            Rank of each exit adapter's map; `None` means a full `hidden_size` square map.
        draft_vocab_size (`int`, *optional*):
            `K`: drafts score only the K token ids in the model's draft vocabulary (`draft_head.vocab_ids`);
            `None` means the full vocabulary. Verification always scores the full vocabulary.
    """

    layer_dropout_max: float = 0.1
    layer_dropout_scale: str = "exponential"
    layer_dropout_layers: list[int] | None = None
    early_exit_loss_scale: float = 0.1
    early_exit_layer_weighting: str = "cumulative"
    early_exit_curriculum: str = "rotational"
    early_exit_curriculum_period: int = 8
    early_exit_gradual_fraction: float = 0.5
    early_exit_layers: list[int] | None = None
    exit_layer: int | None = None
    num_speculations: int = 6
    num_lookup_speculations: int = 0
    lookup_ngram_size: int = 2
    dynamic_exit: bool = False
    exit_adapter_layers: list[int] | None = None
    exit_adapter_rank: int | None = None
    draft_vocab_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.exit_layer is None:
            self.exit_layer = max(1, self.num_hidden_layers // 4)
        self._validate_layerskip()
        super().__post_init__(**kwargs)

    # Not a `validate_*` class validator: those wrap errors in a non-`ValueError` exception type.
    def _validate_layerskip(self):
        num_layers = self.num_hidden_layers
        _check_range("layer_dropout_max", self.layer_dropout_max, 0.0, 1.0)
        _check_choice("layer_dropout_scale", self.layer_dropout_scale, LAYER_DROPOUT_SCALES)
        for layer in self.layer_dropout_layers or ():
            _check_range("layer_dropout_layers", layer, 0, num_layers - 1)
        _check_range("early_exit_loss_scale", self.early_exit_loss_scale, 0.0, 1.0)
        _check_choice("early_exit_layer_weighting", self.early_exit_layer_weighting, EARLY_EXIT_LAYER_WEIGHTINGS)
        _check_choice("early_exit_curriculum", self.early_exit_curriculum, EARLY_EXIT_CURRICULA)
        _check_range("early_exit_curriculum_period", self.early_exit_curriculum_period, 1, float("inf"))
        _check_range("early_exit_gradual_fraction", self.early_exit_gradual_fraction, 0.0, 1.0, low_inclusive=False)
        for layer in self.early_exit_layers or ():
            _check_range("early_exit_layers", layer, 0, num_layers - 1)
        if self.early_exit_curriculum == "fixed" and not self.early_exit_layers:
            raise ValueError("`early_exit_curriculum='fixed'` needs `early_exit_layers`, the exits to train.")
        if num_layers < 2:
            raise ValueError(f"LayerSkip needs at least 2 layers to exit early, got num_hidden_layers={num_layers}.")
        _check_range("exit_layer", self.exit_layer, 1, num_layers - 1)
        _check_range("num_speculations", self.num_speculations, 1, float("inf"))
        _check_range("num_lookup_speculations", self.num_lookup_speculations, 0, float("inf"))
        _check_range("lookup_ngram_size", self.lookup_ngram_size, 1, float("inf"))
        for layer in self.exit_adapter_layers or ():
            _check_range("exit_adapter_layers", layer, 1, num_layers - 1)
        if self.exit_adapter_rank is not None:
            _check_range("exit_adapter_rank", self.exit_adapter_rank, 1, self.hidden_size)
        if self.draft_vocab_size is not None:
            _check_range("draft_vocab_size", self.draft_vocab_size, 1, self.vocab_size)



# The fields LayerSkip adds to a stock config, in declaration order.
LAYERSKIP_FIELDS = tuple(LayerSkipConfigMixin.__annotations__)
# The fields that describe the draft head's weights: set with them, by `set_draft_head`.
DRAFT_HEAD_FIELDS = ("exit_adapter_layers", "exit_adapter_rank", "draft_vocab_size")

__all__ = ["LayerSkipConfigMixin", "LAYERSKIP_FIELDS", "DRAFT_HEAD_FIELDS"]
