"""What LayerSkip adds to a decoder-only model, once for every family: mixins for the base model and the causal LM.

A family's file mixes them in before the stock classes (`class LayerSkipXModel(LayerSkipModelMixin, XModel)`,
`class LayerSkipXForCausalLM(LayerSkipForCausalLMMixin, XForCausalLM)`) and states only what differs from what the
stock model's own forward does: the per-layer attention types and masks (`config.layer_types`, or every layer sliding
where the stock model masks all layers with `config.sliding_window`), the rotary embeddings per layer type, and the
final-logit soft-capping (`config.final_logit_softcapping`) come from the config; the decoder layers (q/k norms, fused
projections, sandwich norms) and the embeddings (Gemma's scaling) are the stock modules, run as they are.

The state-dict keys are the stock class's, so stock checkpoints load into these classes and back. This file travels
with saved checkpoints as remote code: it may import only torch, transformers and same-folder modules.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .draft_head import DraftExit, DraftHead, ExitAdapter
from .layer_dropout import layer_dropout_rates, sample_keep_masks
from .packed_attention import packed_gqa_attention
from .self_speculative import self_speculative_decoding, validate_self_speculative_request

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclass
class LayerSkipModelOutput(BaseModelOutputWithPast):
    r"""
    layer_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
        Each run layer's output, before the final norm, each of shape `(batch_size, sequence_length, hidden_size)`.
        Returned with `output_layer_hidden_states=True`, for the early-exit loss.
    """

    layer_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LayerSkipCausalLMOutput(CausalLMOutputWithPast):
    r"""
    layer_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
        Each run layer's output, before the final norm; see [`LayerSkipModelOutput`].
    """

    layer_hidden_states: tuple[torch.FloatTensor, ...] | None = None


def position_window(key_positions: torch.LongTensor, sliding_window: int):
    """A mask function (as `masking_utils` combines them) keeping the keys within `sliding_window` positions of the
    query, by the tokens' positions `key_positions` `(batch_size, key_length)` rather than by cache slots: a batch's
    self-speculative cache holds rejected drafts as masked holes, so slots and positions differ. The window is the
    stock one (`masking_utils.sliding_window_overlay`): a query at position p sees keys at positions > p − window."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return key_positions[batch_idx, kv_idx] > key_positions[batch_idx, q_idx] - sliding_window

    return inner_mask


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final-logit soft-capping `cap · tanh(logits / cap)` as Gemma's causal LM applies it; the logits when `cap` is
    `None`."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class LayerSkipModelMixin:
    """Early exit, per-sample layer dropout and the one layer runner, for a stock base model (`XModel`)."""

    def resolve_exit_layer(self, exit_layer: int | None) -> int:
        """The number of layers to run: `exit_layer`, or all of them."""
        num_layers = self.config.num_hidden_layers
        if exit_layer is None:
            return num_layers
        if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer <= num_layers:
            raise ValueError(f"`exit_layer` must be an integer in [1, {num_layers}], got {exit_layer!r}.")
        return exit_layer

    @property
    def attention_layer_types(self) -> list[str]:
        """Each layer's attention type, as the stock models pick their masks: `config.layer_types` where the config has
        them (Qwen2, Qwen3, Gemma 3), else every layer sliding when `config.sliding_window` is set (Mistral, Phi-3)."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return list(layer_types)
        sliding = getattr(self.config, "sliding_window", None) is not None
        return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * self.config.num_hidden_layers

    def position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor):
        """The rotary `(cos, sin)`, each `(batch_size or 1, query_length, head_dim)`, for `position_ids`; a family
        with a rotary embedding per layer type returns a dict of them keyed by layer type (see `run_layers`)."""
        return self.rotary_emb(hidden_states, position_ids=position_ids)

    def attention_masks(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        key_positions: torch.LongTensor | None = None,
    ) -> dict:
        """One mask per attention type among layers `start..end-1`, as the stock model builds them (`None` where
        attention needs none); see `run_layers` for the arguments."""
        layer_types = self.attention_layer_types[start:end]
        masks = {}
        for layer_type in dict.fromkeys(layer_types):
            mask_kwargs = dict(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=start + layer_types.index(layer_type) if cache is not None else None,
            )
            if layer_type == SLIDING_ATTENTION:
                if key_positions is None:
                    masks[layer_type] = create_sliding_window_causal_mask(**mask_kwargs)
                else:
                    window = position_window(key_positions, self.config.sliding_window)
                    masks[layer_type] = create_causal_mask(**mask_kwargs, and_mask_function=window)
            # One unpadded query attends to all it sees: no mask needed, unless the cache is static (its layers hold
            # `max_cache_len` slots, the unwritten ones included).
            elif attention_mask is not None or hidden_states.shape[1] > 1 or getattr(cache, "is_compileable", False):
                masks[layer_type] = create_causal_mask(**mask_kwargs)
            else:
                masks[layer_type] = None
        return masks

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        keep_masks: torch.BoolTensor | None = None,
        layer_outputs: list | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict | None = None,
        key_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Runs decoder layers `start..end-1` on `hidden_states`: the one loop over layers, for `forward` and for
        self-speculative decoding's prefill, draft and verification.

        Args:
            hidden_states: `(batch_size, query_length, hidden_size)`, the input of layer `start`.
            position_ids: `(batch_size or 1, query_length)`.
            attention_mask: the 2D padding mask `(batch_size, cached_length + query_length)`, or `None`.
            cache: its layers `start..end-1` must all hold the same length; they are extended by `query_length`.
            keep_masks: `(num_hidden_layers, batch_size)` bool; a layer runs only on the rows it keeps.
            layer_outputs: when a list, each layer's output is appended to it.
            position_embeddings: the rotary `(cos, sin)`, each `(1, query_length, head_dim)`, when already built; or a
                dict of them per layer type (`position_embeddings`).
            key_positions: `(batch_size, cached_length + query_length)`, each cache slot's position, when slots and
                positions differ beyond a constant offset (a batch's self-speculative cache, with holes): sliding
                windows are then taken over positions. The cache must then keep every slot (no sliding-window layers).

        Returns:
            `(batch_size, query_length, hidden_size)`, the output of layer `end - 1`, before the final norm.
        """
        # Inference attends without a copy of the cache per query head (`packed_attention.py`), plain decoding and
        # self-speculative verification alike; training keeps stock `sdpa`, which gradient checkpointing's
        # recomputation calls outside this loop.
        packed = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with packed_gqa_attention(self) if packed else nullcontext():
            masks = self.attention_masks(hidden_states, start, end, position_ids, attention_mask, cache, key_positions)
            if position_embeddings is None:
                position_embeddings = self.position_embeddings(hidden_states, position_ids)
            layer_types = self.attention_layer_types
            for layer_idx, decoder_layer in enumerate(self.layers[start:end], start):
                layer_type = layer_types[layer_idx]
                causal_mask = masks[layer_type]
                layer_position_embeddings = (
                    position_embeddings[layer_type] if isinstance(position_embeddings, dict) else position_embeddings
                )
                layer_kwargs = dict(position_ids=position_ids, cache=cache, **kwargs)
                if keep_masks is None or keep_masks[layer_idx].all():
                    hidden_states = decoder_layer(
                        hidden_states,
                        attention_mask=causal_mask,
                        position_embeddings=layer_position_embeddings,
                        **layer_kwargs,
                    )
                elif keep_masks[layer_idx].any():
                    hidden_states = self._run_kept_rows(
                        decoder_layer,
                        hidden_states,
                        keep_masks[layer_idx],
                        causal_mask,
                        layer_position_embeddings,
                        layer_kwargs,
                    )
                if layer_outputs is not None:
                    layer_outputs.append(hidden_states)
            return hidden_states

    @staticmethod
    def _run_kept_rows(decoder_layer, hidden_states, keep, causal_mask, position_embeddings, layer_kwargs):
        """Runs `decoder_layer` on the rows of `hidden_states` that `keep` selects; the others pass through."""
        rows = keep.nonzero().squeeze(1)  # (num_kept,)

        def take(tensor):
            # Masks, positions and rotary tables may be shared across the batch (leading dimension 1).
            return tensor.index_select(0, rows) if tensor is not None and tensor.shape[0] > 1 else tensor

        layer_kwargs = {**layer_kwargs, "position_ids": take(layer_kwargs["position_ids"])}
        kept = decoder_layer(
            hidden_states.index_select(0, rows),
            attention_mask=take(causal_mask) if isinstance(causal_mask, torch.Tensor) else causal_mask,
            position_embeddings=tuple(take(table) for table in position_embeddings),
            **layer_kwargs,
        )
        return hidden_states.index_copy(0, rows, kept)

    def draw_keep_masks(
        self,
        batch_size: int,
        rates: list[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.BoolTensor | None:
        """Layer-dropout masks `(num_hidden_layers, batch_size)` for a training step, or `None` when nothing drops.

        `rates` (one per layer) overrides the config's schedule.
        """
        if not self.training:
            return None
        if rates is None:
            config = self.config
            rates = layer_dropout_rates(
                config.num_hidden_layers, config.layer_dropout_max, config.layer_dropout_scale, config.layer_dropout_layers
            )
        elif len(rates) != self.config.num_hidden_layers:
            raise ValueError(
                f"`layer_dropout_rates` needs one rate per layer ({self.config.num_hidden_layers}), got {len(rates)}."
            )
        if max(rates) == 0:
            return None
        return sample_keep_masks(rates, batch_size, generator).to(self.embed_tokens.weight.device)

    # Override: early exit, per-sample layer dropout, and every layer's output for the early-exit loss. The decorators
    # are the stock models': `past_key_values=` maps to `cache`, config defaults, output capture, `return_dict=False`.
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        exit_layer: int | None = None,
        layer_dropout_rates: list[float] | None = None,
        layer_dropout_generator: torch.Generator | None = None,
        output_layer_hidden_states: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LayerSkipModelOutput:
        r"""
        exit_layer (`int`, *optional*):
            Run layers `0..exit_layer-1` only, then the final norm.
        layer_dropout_rates (`list[float]`, *optional*):
            One dropout rate per layer, overriding the config's schedule. Used in training mode only.
        layer_dropout_generator (`torch.Generator`, *optional*):
            CPU generator for the layer-dropout masks; seed it alike on every process for identical masks.
        output_layer_hidden_states (`bool`, *optional*):
            Return each run layer's output before the final norm as `layer_hidden_states`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        num_layers = min(self.resolve_exit_layer(exit_layer), self.config.num_hidden_layers)
        keep_masks = self.draw_keep_masks(inputs_embeds.shape[0], layer_dropout_rates, layer_dropout_generator)
        if keep_masks is not None:
            # Dropped rows skip a layer's cache update, so a cache cannot stay consistent across the batch.
            use_cache, cache = False, None
            # The output hooks would record partial batches for partly kept layers and nothing for skipped ones.
            for name in ("output_hidden_states", "output_attentions"):
                if kwargs.get(name, getattr(self.config, name, False)):
                    raise ValueError(
                        f"`{name}` is not supported while layer dropout drops layers (training mode with nonzero "
                        "rates); use `output_layer_hidden_states=True`, or zero rates."
                    )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        layer_outputs = [] if output_layer_hidden_states else None
        hidden_states = self.run_layers(
            inputs_embeds, 0, num_layers, position_ids, attention_mask, cache, keep_masks, layer_outputs, **kwargs
        )
        return LayerSkipModelOutput(
            last_hidden_state=self.norm(hidden_states),
            cache=cache,
            layer_hidden_states=tuple(layer_outputs) if layer_outputs is not None else None,
        )


class LayerSkipForCausalLMMixin:
    """The causal LM around a [`LayerSkipModelMixin`] base model: early-exit logits, the draft head, `generate` with
    `early_exit=E` and self-speculative `assistant_early_exit=E`. A family sets `layerskip_model_class`."""

    layerskip_model_class: type

    # Override: build the LayerSkip decoder instead of the stock one (the stock `__init__` would build the stock one).
    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.model = self.layerskip_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.draft_head = DraftHead(config)
        self.post_init()
        self.generation_config.num_assistant_tokens = config.num_speculations
        # Draft a constant number of tokens unless a confidence threshold is asked for.
        self.generation_config.assistant_confidence_threshold = 0.0

    # Override: a checkpoint shipped as remote code also loads as the base model with `AutoModel`, as the stock model's does.
    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            base = f"{type(self.model).__module__.rsplit('.', 1)[-1]}.{type(self.model).__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": base}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # Override: a fresh exit adapter is the identity, and a draft vocabulary missing from a checkpoint is the first
    # K ids (`draft-vocab` sets the real one).
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ExitAdapter):
            if module.down is not None:
                init.normal_(module.down, std=module.down.shape[1] ** -0.5)
            init.zeros_(module.up)
        elif isinstance(module, DraftHead) and module.vocab_ids is not None:
            init.copy_(module.vocab_ids, torch.arange(len(module.vocab_ids)))

    def set_draft_head(
        self, exit_adapters: dict[int, ExitAdapter] | None = None, draft_vocab: torch.LongTensor | None = None
    ) -> None:
        """Installs exit adapters (keyed by exit layer E, all of one rank) and a draft vocabulary (token ids `(K,)`,
        most frequent first), and records them in the config so that a saved checkpoint loads back with them."""
        exit_adapters = exit_adapters or {}
        ranks = {adapter.down.shape[0] if adapter.down is not None else None for adapter in exit_adapters.values()}
        if len(ranks) > 1:
            raise ValueError(f"Exit adapters must share one rank, got ranks {sorted(ranks, key=str)}.")
        self.config.exit_adapter_layers = sorted(exit_adapters) or None
        self.config.exit_adapter_rank = ranks.pop() if ranks else None
        self.config.draft_vocab_size = len(draft_vocab) if draft_vocab is not None else None
        self.config._validate_layerskip()
        head = DraftHead(self.config).to(self.lm_head.weight.device)
        for layer, adapter in exit_adapters.items():
            head.adapters[str(layer)].load_state_dict(adapter.state_dict())
        if draft_vocab is not None:
            head.vocab_ids.copy_(draft_vocab)
        self.draft_head = head.to(self.lm_head.weight.dtype)

    def draft_exit(self, exit_layer: int) -> DraftExit:
        """The draft's exit at layer `exit_layer`: its exit adapter if it has one, the shared final norm and LM head
        over the draft vocabulary if there is one. Call it once per decoding call: it gathers the head's rows."""
        head = self.draft_head
        return DraftExit(
            self.model.norm, self.lm_head.weight, head.adapter(exit_layer), head.vocab_ids, self.final_logit_softcap
        )

    @property
    def final_logit_softcap(self) -> float | None:
        """The family's final-logit soft-capping (Gemma's `final_logit_softcapping`), applied at every exit."""
        return getattr(self.config, "final_logit_softcapping", None)

    def exit_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The shared exit: final norm, LM head and soft-capping on any layer's output `(..., hidden_size)` ->
        `(..., vocab_size)`."""
        return softcap(self.lm_head(self.model.norm(hidden_states)), self.final_logit_softcap)

    # Override: pass the LayerSkip arguments through to the decoder. Decorators as the stock models'.
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        exit_layer: int | None = None,
        layer_dropout_rates: list[float] | None = None,
        layer_dropout_generator: torch.Generator | None = None,
        output_layer_hidden_states: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LayerSkipCausalLMOutput:
        r"""
        Shapes: `input_ids` `(batch_size, sequence_length)`; `logits` `(batch_size, kept_length, vocab_size)`.

        exit_layer (`int`, *optional*):
            Run layers `0..exit_layer-1` only, then the model's own final norm and LM head.
        layer_dropout_rates (`list[float]`, *optional*):
            One dropout rate per layer, overriding the config's schedule; see [`LayerSkipModelMixin.forward`].
        layer_dropout_generator (`torch.Generator`, *optional*):
            CPU generator for the layer-dropout masks; see [`LayerSkipModelMixin.forward`].
        output_layer_hidden_states (`bool`, *optional*):
            Return each run layer's output before the final norm as `layer_hidden_states`.
        """
        outputs: LayerSkipModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            exit_layer=exit_layer,
            layer_dropout_rates=layer_dropout_rates,
            layer_dropout_generator=layer_dropout_generator,
            output_layer_hidden_states=output_layer_hidden_states,
            # `can_return_tuple` has taken the caller's choice; the decoder's output is read by name here.
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = softcap(self.lm_head(hidden_states), self.final_logit_softcap)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return LayerSkipCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            layer_hidden_states=outputs.layer_hidden_states,
        )

    # Override: `early_exit=E` decodes with the first E layers only (lossy, fastest).
    def generate(self, *args, early_exit: int | None = None, **kwargs):
        """`GenerationMixin.generate`, plus `early_exit=E` and self-speculative `assistant_early_exit=E`."""
        if early_exit is not None:
            if kwargs.get("assistant_early_exit") is not None:
                raise ValueError("Pass either `early_exit` (lossy) or `assistant_early_exit` (lossless), not both.")
            kwargs["exit_layer"] = self.model.resolve_exit_layer(early_exit)
        return super().generate(*args, **kwargs)

    # Override: reject what self-speculative decoding does not support instead of silently falling back.
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        if generation_config.assistant_early_exit is not None:
            validate_self_speculative_request(self, generation_mode, generation_config, generation_mode_kwargs)

    # Override: verification runs only the layers the draft has not run, over one shared cache.
    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        if generation_config.assistant_early_exit is None:
            return super()._assisted_decoding(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
        if "cache" in kwargs:
            kwargs["cache"] = without_sliding_window_layers(kwargs["cache"])
        return self_speculative_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)


def without_sliding_window_layers(cache):
    """`cache`, or a fresh `DynamicCache` keeping every position where `cache` is an empty one with sliding-window
    layers: self-speculative decoding rolls rejected drafts back, which a sliding-window layer cannot once it has
    dropped old positions, so it keeps them all and masks each sliding layer's window instead (`run_layers`)."""
    if not isinstance(cache, DynamicCache) or not any(
        isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers
    ):
        return cache
    if cache.get_seq_length() > 0:
        raise ValueError(
            "Self-speculative decoding cannot continue from a cache with sliding-window layers (a plain `generate`'s "
            "cache for this model): it must roll rejected drafts back. Continue from the cache a self-speculative "
            "call returned, or start without one."
        )
    return DynamicCache()



__all__ = [
    "LayerSkipModelMixin",
    "LayerSkipForCausalLMMixin",
    "LayerSkipModelOutput",
    "LayerSkipCausalLMOutput",
]
