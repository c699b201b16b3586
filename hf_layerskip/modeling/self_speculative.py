"""Self-speculative decoding (LayerSkip, arXiv 2404.16710, section 5) over one shared KV cache, for a batch.

Each round drafts up to `d` tokens with layers `0..E-1` and the model's own final norm and LM head, then
verifies them with layers `E..L-1` only:

- **prefill**: every layer processes the prompt but its last token;
- **draft**: layers `0..E-1` process one token per row at a time, writing their KV entries into *the* cache and
  keeping their outputs (the exit-query cache). With lookup drafting on, a round whose sequence's last tokens occurred
  earlier in it drafts the tokens that followed them instead, at no layer pass (prompt lookup);
- **verify**: layers `0..E-1` process only what no draft step has run (the last draft token, or every looked-up
  token); layers `E..L-1` process the exit-query cache plus those, in one pass. Nothing is computed twice;
- **accept**: per row, the longest prefix the full model agrees with (greedy) or keeps (speculative sampling), plus
  one token of the full model.

Rows draft and verify together but accept different numbers of tokens. The cache keeps the longest row's accepted
positions; the others' rejected drafts stay behind as holes that the attention mask hides, and the cache is
compacted when holes make up half of it. Finished rows leave the batch. Between rounds every cache layer holds all of
a row's tokens but the last one. Greedy output equals plain greedy decoding token for token, row by row; sampling is
exact speculative sampling. This file travels with saved checkpoints as remote code.

The cache is a `DynamicCache` (rejected drafts are cropped) or a `StaticCache` (its write position is rewound and
rejected drafts are overwritten; see `StaticCacheSlots`). Where `generate` would compile plain decoding, the draft
and verification layer passes are compiled, on fixed shapes. Greedy decoding reads the device once per round.
"""

import copy
import time
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map
from transformers.cache_utils import Cache, DynamicCache, StaticCache, StaticLayer
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList, PrefixConstrainedLogitsProcessor
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StopStringCriteria,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from .dynamic_drafting import ExitChooser
from .round_planning import LookupPlanner

# Rotary types whose frequencies depend on how long the sequence is so far: their tables cannot be built up front.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# A batch's cache is compacted once this fraction of its slots, and at least this many, are holes in every row.
_COMPACT_AT_HOLE_FRACTION = 0.5
_MIN_SLOTS_TO_COMPACT = 32


def acceptance_rate(accepted_tokens: int, drafted_tokens: int) -> float:
    """Fraction of drafted tokens the full model accepted; 0 when nothing was drafted. The one definition, for the
    decoder's counts and every summary of them."""
    return accepted_tokens / drafted_tokens if drafted_tokens else 0.0


@dataclass
class SpeculationStats:
    """Counts of one self-speculative `generate` call, summed over the rows of the batch."""

    # Draft-and-verify rounds of the batch.
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # Passes through layers 0..E-1 and the draft's exit; more than `drafted_tokens` where a withheld draft's step ran.
    draft_steps: int = 0
    # Rounds whose drafts were looked up in the sequence itself rather than drafted by the early exit.
    lookup_rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return acceptance_rate(self.accepted_tokens, self.drafted_tokens)


class RowCounts:
    """Per-row counts of one call, each `(batch_size,)`; `from_draft` holds, per row, for each new token whether the
    early exit drafted it and the full model accepted it (else verification produced it)."""

    def __init__(self, batch_size: int):
        self.rounds = torch.zeros(batch_size, dtype=torch.long)
        self.drafted_tokens, self.draft_steps, self.accepted_tokens = (torch.zeros_like(self.rounds) for _ in range(3))
        self.from_draft: list[list[bool]] = [[] for _ in range(batch_size)]
        self.batch_rounds = self.lookup_rounds = 0

    def add_round(self, rows: list[int], num_drafted: int, num_draft_steps: int, looked_up: bool) -> None:
        """A round of the batch in which `rows` took part; `looked_up` when its drafts came from lookup."""
        self.batch_rounds += 1
        self.lookup_rounds += looked_up
        self.rounds[rows] += 1
        self.drafted_tokens[rows] += num_drafted
        self.draft_steps[rows] += num_draft_steps

    def totals(self) -> SpeculationStats:
        return SpeculationStats(
            self.batch_rounds,
            int(self.drafted_tokens.sum()),
            int(self.accepted_tokens.sum()),
            int(self.draft_steps.sum()),
            self.lookup_rounds,
        )


@dataclass
class SelfSpeculativeOutput(GenerateDecoderOnlyOutput):
    r"""
    A [`GenerateDecoderOnlyOutput`] plus the speculation counts, per row.

    rounds (`torch.LongTensor` of shape `(batch_size,)`): draft-and-verify rounds each row took part in.
    drafted_tokens (`torch.LongTensor` of shape `(batch_size,)`): tokens drafted by the early exit.
    draft_steps (`torch.LongTensor` of shape `(batch_size,)`): draft passes, those of withheld (unconfident) drafts
    included. accepted_tokens (`torch.LongTensor` of shape `(batch_size,)`): drafted tokens the full model accepted.
    acceptance_rate (`torch.FloatTensor` of shape `(batch_size,)`): their ratio.
    from_draft (`torch.BoolTensor` of shape `(batch_size, new_tokens)`): which new tokens are accepted drafts (the
    rest come from verification, or are padding after a row's end).
    """

    rounds: torch.LongTensor | None = None
    drafted_tokens: torch.LongTensor | None = None
    draft_steps: torch.LongTensor | None = None
    accepted_tokens: torch.LongTensor | None = None
    acceptance_rate: torch.FloatTensor | None = None
    from_draft: torch.BoolTensor | None = None


def validate_self_speculative_request(model, generation_mode, generation_config, generation_mode_kwargs) -> None:
    """Raises a `ValueError` for every setting self-speculative decoding does not support."""
    num_layers = model.config.num_hidden_layers
    exit_layer = generation_config.assistant_early_exit
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer < num_layers:
        raise ValueError(f"`assistant_early_exit` must be an integer in [1, {num_layers - 1}], got {exit_layer!r}.")
    num_speculations = generation_config.num_assistant_tokens
    if not isinstance(num_speculations, int) or isinstance(num_speculations, bool) or num_speculations < 1:
        raise ValueError(f"`num_assistant_tokens` must be an integer >= 1, got {num_speculations!r}.")
    threshold = generation_config.assistant_confidence_threshold or 0.0
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`assistant_confidence_threshold` must be in [0, 1], got {threshold!r}.")
    for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
        value = getattr(generation_config, name)
        low = 0 if name == "prompt_lookup_num_tokens" else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"`{name}` must be an integer >= {low} (or None: the model config's), got {value!r}.")
    if generation_mode != GenerationMode.ASSISTED_GENERATION:
        raise ValueError(
            "Self-speculative decoding (`assistant_early_exit`) supports greedy decoding and sampling with "
            f"num_beams=1, got generation mode {generation_mode!r} (num_beams={generation_config.num_beams})."
        )
    unsupported = {
        "assistant_model": generation_mode_kwargs.get("assistant_model") is not None,
        "use_mtp": bool(generation_config.use_mtp),
        "assistant_ensemble_weight": generation_config.assistant_ensemble_weight is not None,
        # Classifier-free guidance runs the model once per step on its own cache: drafts would corrupt it.
        "guidance_scale": generation_config.guidance_scale not in (None, 1),
        # The draft and verification passes call the decoder layers directly, outside transformers' output capture.
        "output_attentions": bool(generation_config.output_attentions),
        "synced_gpus": bool(generation_mode_kwargs.get("synced_gpus")),
        # Drafts are written into the one cache.
        "use_cache=False": generation_config.use_cache is False,
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"`{name}` is not supported with self-speculative decoding (`assistant_early_exit`).")
    if generation_config.cache_implementation not in SUPPORTED_CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"`cache_implementation={generation_config.cache_implementation!r}` is not supported with self-speculative "
            f"decoding (`assistant_early_exit`); use one of {SUPPORTED_CACHE_IMPLEMENTATIONS} (None: a DynamicCache)."
        )
    schedule = generation_config.num_assistant_tokens_schedule
    if schedule not in (None, "constant"):
        raise ValueError(
            "Self-speculative decoding drafts a constant number of tokens (num_assistant_tokens_schedule="
            f"'constant'); got num_assistant_tokens_schedule={schedule!r}."
        )


def validate_batch_request(
    batch_size: int, generation_config, logits_processor, stopping_criteria, streamer, attention_mask
) -> None:
    """Raises a `ValueError` for what a batch (or its padding) does not support."""
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "Self-speculative decoding needs left padding: every row's last prompt token must be a real token "
            "(attention_mask[:, -1] == 1); set `tokenizer.padding_side = 'left'`."
        )
    if batch_size == 1:
        return
    record = generation_config.return_dict_in_generate
    unsupported = {
        "streamer": streamer is not None,
        # Plain decoding's per-step tensors cover finished rows too, with scores of the padding it feeds them.
        "output_scores": record and bool(generation_config.output_scores),
        "output_logits": record and bool(generation_config.output_logits),
        "output_hidden_states": record and bool(generation_config.output_hidden_states),
        # Its function is called with the row's index in the batch, which per-row processing does not keep.
        "prefix_allowed_tokens_fn": any(isinstance(p, PrefixConstrainedLogitsProcessor) for p in logits_processor),
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(
                f"`{name}` is not supported with batched self-speculative decoding (batch size {batch_size}); "
                "decode one sequence per call to use it."
            )
    # Without an eos token, plain decoding keeps generating for rows that a criterion has stopped until every row has
    # stopped; rows that stop one by one are padded only when there is one.
    has_eos = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)
    row_stoppers = [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, MaxTimeCriteria))]
    if not has_eos and row_stoppers:
        names = sorted({type(c).__name__ for c in row_stoppers})
        raise ValueError(
            f"Batched self-speculative decoding stops rows with {names} only when an eos token is set (finished rows "
            f"are then padded as plain decoding pads them); set `eos_token_id`, or decode one sequence per call."
        )


SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Crops every cache layer to its first `length` positions (layers may hold different lengths)."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)


def lookup_continuation(
    sequence: torch.LongTensor, max_ngram_size: int, num_tokens: int
) -> tuple[int, torch.LongTensor]:
    """Prompt lookup: the (up to) `num_tokens` tokens that followed the most recent earlier occurrence of the last `n`
    tokens of `sequence` `(length,)`, for the largest `n <= max_ngram_size` that occurred before, and that `n`: `(n,
    continuation)`, or `(0, an empty continuation)` if none did."""
    length = len(sequence)
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        windows = sequence[: length - 1].unfold(0, n, 1)  # (length - n, n): every earlier n-gram with a successor
        hits = (windows == sequence[length - n :]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return n, sequence[start : start + num_tokens]
    return 0, sequence[:0]


class DynamicCacheSlots:
    """The decoder's slots on a `DynamicCache`: a layer holds exactly the slots written to it; rejected drafts are
    cropped, and rows and slots are dropped by building narrower tensors."""

    # A dynamic cache grows as it is written: no slot limit.
    capacity: int | None = None

    def __init__(self, cache: DynamicCache, num_layers: int, batch_size: int):
        self.cache = cache

    def length(self, layer: int) -> int:
        """Slots held by `layer` (a host int: a dynamic layer's length is its tensor's shape)."""
        return self.cache.get_seq_length(layer)

    def written(self, first_layer: int, end_layer: int, count: int) -> None:
        """Layers `first_layer..end_layer-1` have each written `count` more slots (their tensors say so already)."""

    def truncate(self, length: int) -> None:
        """Every layer holds at most its first `length` slots."""
        crop_cache(self.cache, length)

    def attention_mask(self, slot_mask: torch.BoolTensor, end: int) -> torch.BoolTensor:
        """The 2D mask of a step whose queries end at slot `end`: `slot_mask` `(rows, capacity)` cut to the slots the
        layers hold then."""
        return slot_mask[:, :end]

    def select_rows(self, keep: torch.LongTensor) -> None:
        """Keeps the active rows `keep` `(num_kept,)`."""
        for layer in self.cache.layers:
            layer.batch_select_indices(keep)

    def widen(self, hidden_states, position_ids, attention_mask):
        """A step's inputs, one row per active row, as the cache's rows take them (here: the same)."""
        return hidden_states, position_ids, attention_mask

    def narrow(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """A step's output `(cache rows, ...)` cut to the active rows (here: the same)."""
        return hidden_states

    def move_slots(self, source: torch.LongTensor) -> None:
        """Every layer keeps, per row, the slots `source` `(rows, width)` in that order: slot `j` of row `i` becomes
        what slot `source[i, j]` was; layers hold `width` slots after."""
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name)  # (rows, num_heads, slots, head_dim)
                setattr(layer, name, states.gather(2, _slot_index(source, states)))


class StaticCacheSlots:
    """The decoder's slots on a `StaticCache`: every layer holds `max_cache_len` slots at fixed addresses (what compiled
    steps need) and writes at its own write position (`cumulative_length`, a device tensor). Rejected drafts are not
    cropped: the write position is rewound, and the next writes overwrite them. Slots beyond a layer's write position
    hold stale entries, which the causal mask hides (a query sees only slots up to its own) and the full-length slot
    mask hides from the other rows. The lengths are kept on the host, so that reading them does not synchronise.

    The batch keeps its size too: rows that have left keep their places in the cache and ride along in every step
    (attending to all their slots, their outputs dropped), so that shapes, and compiled graphs, stay the same."""

    def __init__(self, cache: StaticCache, num_layers: int, batch_size: int):
        self.cache = cache
        self.batch_size = batch_size
        self.rows: torch.LongTensor | None = None  # the active rows' places in the cache; `None`: every row, in order
        self.capacity = cache.layers[0].max_cache_len
        # One synchronisation per call: a returned cache may already hold an earlier turn.
        self.held = [int(cache.get_seq_length(layer)) for layer in range(num_layers)]

    def length(self, layer: int) -> int:
        return self.held[layer]

    def written(self, first_layer: int, end_layer: int, count: int) -> None:
        for layer in range(first_layer, end_layer):
            self.held[layer] += count

    def truncate(self, length: int) -> None:
        for layer, held in zip(self.cache.layers, self.held):
            if held > length:
                layer.cumulative_length.fill_(length)  # in place: the tensor's address is static
        self.held = [min(held, length) for held in self.held]

    def attention_mask(self, slot_mask: torch.BoolTensor, end: int) -> torch.BoolTensor:
        # A static layer's keys span all its slots; so must the mask (one shape for every step).
        return slot_mask

    def select_rows(self, keep: torch.LongTensor) -> None:
        self.rows = keep if self.rows is None else self.rows[keep]

    def widen(self, hidden_states, position_ids, attention_mask):
        if self.rows is None:
            return hidden_states, position_ids, attention_mask

        def widened(tensor, fill):
            wide = tensor.new_full((self.batch_size, *tensor.shape[1:]), fill)
            return wide.index_copy(0, self.rows, tensor)

        mask = None if attention_mask is None else widened(attention_mask, True)
        return widened(hidden_states, 0), widened(position_ids, 0), mask

    def narrow(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states if self.rows is None else hidden_states.index_select(0, self.rows)

    def move_slots(self, source: torch.LongTensor) -> None:
        width = source.shape[1]
        for layer in self.cache.layers:
            for states in (layer.keys, layer.values):  # (batch_size, num_heads, max_cache_len, head_dim)
                active = states if self.rows is None else states[self.rows]
                moved = active.gather(2, _slot_index(source, active))
                if self.rows is None:
                    states[:, :, :width] = moved
                else:
                    states[self.rows, :, :width] = moved
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(width)
        self.held = [width] * len(self.held)


def _slot_index(source: torch.LongTensor, states: torch.Tensor) -> torch.LongTensor:
    """`source` `(rows, width)` as a gather index over the slots of `states` `(rows, num_heads, slots, head_dim)`."""
    return source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])


def cache_slots(cache, num_layers: int, batch_size: int) -> DynamicCacheSlots | StaticCacheSlots:
    """The slot bookkeeping for `cache` of a batch of `batch_size` rows; raises a `ValueError` for a cache the decoder
    cannot draft into."""
    if type(cache) is DynamicCache:
        return DynamicCacheSlots(cache, num_layers, batch_size)
    if type(cache) is StaticCache and all(type(layer) is StaticLayer for layer in cache.layers):
        return StaticCacheSlots(cache, num_layers, batch_size)
    raise ValueError(
        "Self-speculative decoding needs a `DynamicCache` or a `StaticCache` without sliding-window layers "
        f"(`cache_implementation` None, 'dynamic' or 'static'), got {type(cache).__name__}."
    )


def run_decoder_layers(
    model,
    hidden_states,
    first_layer,
    end_layer,
    position_ids,
    attention_mask,
    cache,
    rotary_tables,
    layer_outputs=None,
    key_positions=None,
) -> torch.Tensor:
    """Layers `first_layer..end_layer-1` on `hidden_states` `(rows, query_length, hidden_size)` at `position_ids`
    `(rows, query_length)`, writing into `cache`: one draft, verification or prefill pass. `rotary_tables`: (cos,
    sin), each `(num_positions, head_dim)` (a dict of them per layer type where the model's rotary embedding differs
    by layer type), or `None` to build them from the positions. `key_positions` `(rows, key_length)`: each cache
    slot's position, for sliding windows. Returns the last layer's output, same shape; appends each layer's to
    `layer_outputs` when a list."""
    position_embeddings = None
    if rotary_tables is not None:
        position_embeddings = tree_map(lambda table: table[position_ids], rotary_tables)
    return model.model.run_layers(
        hidden_states,
        first_layer,
        end_layer,
        position_ids,
        attention_mask,
        cache,
        layer_outputs=layer_outputs,
        position_embeddings=position_embeddings,
        key_positions=key_positions,
    )


# `run_decoder_layers` compiled, per compile configuration.
_compiled_layer_runs: dict = {}


def compiled_decoder_layers(compile_config):
    """[`run_decoder_layers`] under `torch.compile` with `compile_config` (a transformers `CompileConfig`), compiled
    once per configuration; each layer range and shape is its own graph (a draft step, a padded verification)."""
    options = compile_config.to_dict()
    key = repr(sorted(options.items(), key=lambda item: item[0]))
    if key not in _compiled_layer_runs:
        _compiled_layer_runs[key] = torch.compile(run_decoder_layers, **options)
    return _compiled_layer_runs[key]


def step_compile_config(model, generation_config, model_kwargs):
    """The `CompileConfig` to compile the draft and verification steps with, or `None`: compiled exactly where
    `generate` compiles plain decoding's forward (`_valid_auto_compile_criteria`: a static cache on an accelerator,
    or anywhere `compile_config` asks for every device)."""
    if not model._valid_auto_compile_criteria(model_kwargs, generation_config):
        return None
    return generation_config.compile_config or model._default_compile_config()


def _select(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """Next token per row from processed scores `(rows, vocab_size)` -> `(rows,)`."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
    return scores.argmax(dim=-1)


# Logits-processor settings that hold one entry per row of the batch, as `generate` builds them.
_PER_ROW_PROCESSOR_SETTINGS = (
    "prompt_ignore_length",  # the repetition penalty's padding lengths `(batch_size,)`
    "encoder_input_ids",  # the encoder repetition penalty's prompts `(batch_size, prompt_length)`
)


def per_row_processors(logits_processor, batch_size: int) -> list:
    """One logits-processor list per row, for calls on that row alone: settings held per row of the batch are cut
    to the row."""
    if batch_size == 1 or not logits_processor:
        return [logits_processor] * batch_size
    lists = []
    for row in range(batch_size):
        processors = []
        for processor in logits_processor:
            per_row = {
                name: value[row : row + 1]
                for name in _PER_ROW_PROCESSOR_SETTINGS
                if isinstance(value := getattr(processor, name, None), torch.Tensor) and len(value) == batch_size
            }
            if per_row:
                processor = copy.copy(processor)
                processor.__dict__.update(per_row)
            processors.append(processor)
        lists.append(LogitsProcessorList(processors))
    return lists


def process_scores(logits_processor, row_tokens: torch.LongTensor, length: int, scores: torch.Tensor) -> torch.Tensor:
    """One row's processed scores `(n, vocab_size)`: row `i` of the raw `scores` predicts the token after
    `row_tokens[:, : length + i]` `(1, ...)`, and is processed as plain decoding processes that step."""
    if not logits_processor:
        return scores
    return torch.cat([logits_processor(row_tokens[:, : length + i], scores[i : i + 1]) for i in range(len(scores))])


class SelfSpeculativeDecoder:
    """A batch's self-speculative decoding: the tokens, the shared KV cache, the draft and the exit-query cache.

    Two coordinate systems:

    - a row's **sequence**: `tokens` `(batch_size, max_length)` holds each row's (left-padded) prompt, its accepted
      tokens, then its current draft; slices of it serve as `input_ids`. `lengths` `(num_active,)` counts each active
      row's tokens; the last one, the *pending* token, no layer has processed yet;
    - the cache's **slots**, shared by the batch: each round appends the same slots to every active row, and since
      rows accept different numbers of drafts, a row's rejected drafts stay behind as holes. `slot_mask`
      `(num_active, capacity)` hides padding and holes from attention (`None` for one unpadded row, which has none);
      `slot_positions` holds each slot's position in its row (what the rotary embedding sees). `filled` slots are in
      the cache; the pending tokens go to slot `filled`.

    With one row, slots and sequence indices coincide. `rows` `(num_active,)` maps active rows to batch rows; finished
    rows leave. `exit_query_cache` `(num_active, num_draft_steps, hidden_size)` holds the exit layer's outputs of the
    round's slots, which layers `E..L-1` have not processed yet; `verify` consumes it.

    With `output_hidden_states` (one row only), `layer_outputs` keeps each layer's outputs, in pieces, for the
    positions from `recorded_from` on; `take_hidden_states` turns the accepted ones into what plain decoding returns.
    """

    def __init__(
        self, model, generation_config, logits_processor, input_ids, cache: Cache, attention_mask, compile_config=None
    ):
        self.model = model
        self.exit_layer = generation_config.assistant_early_exit
        self.draft_exit = model.draft_exit(self.exit_layer)
        # Dynamic drafting: each round's exit among the requested one and those with an exit adapter.
        self.exit_chooser, self.draft_exits = None, {self.exit_layer: self.draft_exit}
        if model.config.dynamic_exit:
            exits = sorted({self.exit_layer, *(model.config.exit_adapter_layers or ())})
            self.exit_chooser = ExitChooser(exits, model.config.num_hidden_layers)
            self.draft_exits = {exit_layer: self.draft_exit.at(model, exit_layer) for exit_layer in exits}
        self.num_speculations = generation_config.num_assistant_tokens
        self.confidence_threshold = generation_config.assistant_confidence_threshold or 0.0
        # Lookup drafting: `generate`'s prompt-lookup settings, else the model config's defaults.
        lookup_tokens, ngram_size = generation_config.prompt_lookup_num_tokens, generation_config.max_matching_ngram_size
        self.num_lookup_tokens = model.config.num_lookup_speculations if lookup_tokens is None else lookup_tokens
        self.lookup_ngram_size = ngram_size or model.config.lookup_ngram_size
        # A batch's lookup round verifies its longest lookup in every row, which a compute-bound device pays for:
        # a batch looks up where the call measures it pays. One row verifies a few positions for about one step.
        self.lookup_planner = LookupPlanner() if self.num_lookup_tokens and input_ids.shape[0] > 1 else None
        self.lookup_matches: list[tuple[int, int]] = []  # the round's (match length, continuation length) per row
        eos = getattr(generation_config, "_eos_token_tensor", None)  # set by `generate`
        self.eos_token_ids = None if eos is None else eos.flatten().to(input_ids.device)
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.row_processors = per_row_processors(logits_processor, input_ids.shape[0])  # indexed by batch row
        self.cache = cache
        self.slots = cache_slots(cache, len(model.model.layers), input_ids.shape[0])
        self.exit_query_cache: torch.Tensor | None = None
        record = generation_config.return_dict_in_generate and generation_config.output_hidden_states
        self.layer_outputs = [[] for _ in model.model.layers] if record else None
        self.recorded_from = 0
        # `output_hidden_states` may select hidden states by index; the others are `None`, as plain decoding gives them.
        selected = selected_hidden_states(generation_config.output_hidden_states)
        self.selected_hidden_states = None if selected is None else resolve_hidden_states_indices(model.model, selected)

        batch_size, prompt_length = input_ids.shape
        device, self.max_length = input_ids.device, generation_config.max_length
        self.batch_size = batch_size
        self.tokens = input_ids.new_zeros((batch_size, self.max_length))  # `generate` checked the prompt is shorter
        self.tokens[:, :prompt_length] = input_ids
        self.rows = torch.arange(batch_size, device=device)
        self.lengths = torch.full((batch_size,), prompt_length, device=device)
        # The same on the host, so that the loop reads them without synchronising.
        self.host_rows, self.host_lengths = list(range(batch_size)), [prompt_length] * batch_size
        self.sequence_lengths = self.lengths.clone()  # (batch_size,): final once a row has left
        if attention_mask is None and batch_size > 1:
            attention_mask = torch.ones_like(input_ids)
        # Compiled steps run on fixed shapes: one query token per draft step, `d + 1` per verification (padded).
        self.layer_steps = run_decoder_layers
        self.verify_width = None
        if compile_config is not None and self.layer_outputs is None:
            self.layer_steps = compiled_decoder_layers(compile_config)
            self.verify_width = self.num_speculations + 1
        self.round_width = 0  # slots opened this round
        capacity = self.slots.capacity or self.max_length
        if capacity < self.max_length - 1:
            raise ValueError(
                f"The static cache holds {capacity} positions; decoding to max_length={self.max_length} needs at "
                f"least {self.max_length - 1}."
            )
        self.slot_positions = torch.arange(capacity, device=device).repeat(batch_size, 1)
        self.slot_mask = None  # nothing is padded: causal masking alone
        if attention_mask is not None:
            # As `generate` numbers them: 0, 1, ... over the real tokens, 0 at padding.
            prompt_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            self.slot_positions[:, :prompt_length] = prompt_positions
            self.slot_mask = torch.zeros((batch_size, capacity), dtype=torch.bool, device=device)
            self.slot_mask[:, :prompt_length] = attention_mask.bool()
            # (num_active,) on the host: the cache's slots that are a row's tokens, once prefilled (one sync per call).
            self.valid_slots = attention_mask[:, :-1].sum(dim=-1).tolist()
        self.next_positions = self.slot_positions[:, prompt_length - 1].clone()  # (num_active,): of the pending tokens
        self.filled = 0
        rotary = model.model.rotary_emb
        # cos and sin, each (num_positions, head_dim), indexed by position; a dict of them per layer type where the
        # model's rotary embedding differs by layer type (`position_embeddings`).
        self.rotary_tables = None
        if not any(kind in str(rotary.rope_type) for kind in _LENGTH_DEPENDENT_ROPE):
            # Padded verification positions run up to `d` past the last token; a static cache's length bounds them
            # (and keeps the tables one shape across calls).
            num_positions = self.slots.capacity or self.max_length + self.num_speculations
            all_positions = torch.arange(num_positions, device=device)[None]
            tables = model.model.position_embeddings(model.model.embed_tokens.weight, all_positions)
            self.rotary_tables = tree_map(lambda table: table[0], tables)

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def run_layers(
        self, hidden_states: torch.Tensor, first_layer: int, end_layer: int, fixed_shape: bool = True
    ) -> torch.Tensor:
        """[`run_decoder_layers`] on the slots right after those the cache of `first_layer` holds; compiled when
        `fixed_shape` and the call compiles its steps.

        `hidden_states` `(num_active, query_length, hidden_size)` is the input of `first_layer`; returns the output of
        `end_layer - 1`, same shape. Records each layer's output with `output_hidden_states`.
        """
        start = self.slots.length(first_layer)
        end = start + hidden_states.shape[1]
        mask = None if self.slot_mask is None else self.slots.attention_mask(self.slot_mask, end)
        # Contiguous: one memory layout for every step (a compiled step's guards check strides).
        position_ids = self.slot_positions[:, start:end].contiguous()
        hidden_states, position_ids, mask = self.slots.widen(hidden_states, position_ids, mask)
        outputs = None if self.layer_outputs is None else []
        # Sliding windows count positions, not slots (a batch's cache has holes); static caches take no such layers.
        key_positions = self.slot_positions[:, :end] if self.slots.capacity is None else None
        run = self.layer_steps if fixed_shape else run_decoder_layers
        hidden_states = run(
            self.model, hidden_states, first_layer, end_layer, position_ids, mask, self.cache, self.rotary_tables,
            outputs, key_positions,
        )
        self.slots.written(first_layer, end_layer, hidden_states.shape[1])
        if run is not run_decoder_layers:
            # A compiled step under CUDA graphs ("reduce-overhead") overwrites its output on its next replay, and a
            # round keeps several draft steps' outputs: copy it out, as `generate` copies plain decoding's logits.
            hidden_states = hidden_states.clone()
        hidden_states = self.slots.narrow(hidden_states)
        if outputs is not None:
            for layer, output in enumerate(outputs, first_layer):
                self.layer_outputs[layer].append(output)
        return hidden_states

    def prefill(self) -> None:
        """Every layer processes the prompt but its last token, which the first draft step takes.

        The cache may already hold a prefix of the prompt (an earlier turn's returned cache): only the rest is run.
        """
        num_layers = len(self.model.model.layers)
        cached = {self.slots.length(layer) for layer in range(num_layers)}
        if len(cached) > 1:
            raise ValueError(f"Every cache layer must hold the same number of tokens, got {sorted(cached)}.")
        prompt_length = self.host_lengths[0]
        # A cache holding the whole prompt gives back its last token, which the first draft step processes.
        self.slots.truncate(prompt_length - 1)
        start = self.recorded_from = self.slots.length(0)
        if start < prompt_length - 1:
            prompt = self.model.model.embed_tokens(self.tokens[:, start : prompt_length - 1])
            self.run_layers(prompt, 0, num_layers, fixed_shape=False)
        self.filled = prompt_length - 1

    def open_slots(self, count: int) -> None:
        """Slots `filled..filled+count-1` take each row's pending token and its next `count - 1` draft tokens; with
        compiled steps, verification's padding takes the slots after them, up to `d + 1` in all."""
        count = max(count, self.verify_width or 0)
        capacity = self.slots.capacity
        if capacity is not None and self.filled + count > capacity and self.slot_mask is not None:
            self._compact()  # a batch's holes have used up a static cache: drop them
        if capacity is not None:
            count = min(count, capacity - self.filled)  # a user's static cache may leave no room for padding
        start = self.filled
        self.round_width = count
        self._reserve(start + count)
        self.slot_positions[:, start : start + count] = self.next_positions[:, None] + torch.arange(
            count, device=self.rows.device
        )
        if self.slot_mask is not None:
            self.slot_mask[:, start : start + count] = True

    def draft_step(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per active row `(num_active,)` through layers `0..E-1` and the draft's exit, at the next slot.

        Returns the exit layer's output `(num_active, 1, hidden_size)` and the raw float scores
        `(num_active, vocab_size)` of the token after it.
        """
        hidden = self.model.model.embed_tokens(input_ids[:, None])  # (num_active, 1, hidden_size)
        hidden = self.run_layers(hidden, 0, self.exit_layer)
        return hidden, self.draft_exit(hidden[:, -1])

    def draft(self) -> tuple[int, torch.Tensor | None]:
        """Drafts after each active row's pending token, writing the drafts into `tokens` after it.

        By lookup where any row's last tokens occurred earlier in it (in a batch, as many looked-up tokens as the
        call's `LookupPlanner` finds pay, maybe none); else with the early exit. Every row drafts while any row still
        proposes: a row stops proposing at a token its exit is less confident of than the threshold, or after drafting
        eos, but goes on drafting as long as the batch does (the step costs the batch nothing more, and verification
        still judges every draft). A step at which no row proposes is withheld: its token is not drafted, and
        verification goes on from its exit state, so no layer pass is lost.

        Returns the number of drafted tokens `k` and the processed draft scores `(num_active, k, vocab_size)`, or
        `None` when nothing was drafted.
        """
        rows, lengths, tokens = self.rows, self.lengths, self.tokens
        # The full model's token after the draft also has to fit in `max_length`.
        room = self.max_length - max(self.host_lengths) - 1
        if self.num_lookup_tokens and room > 0:
            # Compiled verification takes at most `d + 1` positions.
            limit = min(self.num_lookup_tokens, room, self.num_speculations if self.verify_width else room)
            looked_up = [
                lookup_continuation(tokens[row, :length], self.lookup_ngram_size, limit)
                for row, length in zip(self.host_rows, self.host_lengths)
            ]
            self.lookup_matches = [(match_length, len(continuation)) for match_length, continuation in looked_up]
            width = 1 + max(length for _, length in self.lookup_matches)
            if width > 1 and self.lookup_planner is not None:
                width = self.lookup_planner.lookup_width(self.lookup_matches)
            if width > 1:
                self.lookup_matches = [(match, min(length, width - 1)) for match, length in self.lookup_matches]
                return self.draft_by_lookup([continuation[: width - 1] for _, continuation in looked_up])
        if self.exit_chooser is not None:
            self.exit_layer = self.exit_chooser.choose()
            self.draft_exit = self.draft_exits[self.exit_layer]
        budget = max(min(self.num_speculations, room), 0)
        self.open_slots(budget + 1)
        inputs = tokens[rows, lengths - 1]  # the pending tokens
        proposing = torch.ones_like(rows, dtype=torch.bool)
        exit_states, draft_scores = [], []
        for step in range(budget):
            hidden, scores = self.draft_step(inputs)
            exit_states.append(hidden)
            if self.logits_processor:
                scores = torch.cat(
                    [
                        process_scores(self.row_processors[row], tokens[row : row + 1], length + step, scores[i : i + 1])
                        for i, (row, length) in enumerate(zip(self.host_rows, self.host_lengths))
                    ]
                )
            if self.confidence_threshold > 0:
                proposing &= scores.softmax(dim=-1).max(dim=-1).values >= self.confidence_threshold
                if not proposing.any():
                    break
            inputs = _select(scores, self.do_sample)
            tokens[rows, lengths + step] = inputs
            draft_scores.append(scores)
            if self.eos_token_ids is not None:
                proposing &= ~torch.isin(inputs, self.eos_token_ids)
                if not proposing.any():
                    break
        self.exit_query_cache = torch.cat(exit_states, dim=1) if exit_states else self._no_exit_states()
        return len(draft_scores), torch.stack(draft_scores, dim=1) if draft_scores else None

    def draft_by_lookup(self, continuations: list[torch.LongTensor]) -> tuple[int, torch.Tensor | None]:
        """Drafts, after each active row's pending token, the tokens its own sequence continued with the last time it
        read as now (`continuations`, one per active row, at least one non-empty), with no layer pass: verification
        runs every layer on them. Shorter continuations are padded by repeating their row's last token (a proposal
        like any other: verification judges it).

        Returns the number of drafted tokens `k` and, when sampling, the draft's distribution as scores
        `(num_active, k, vocab_size)`: all its mass on the proposed token. Any proposal keeps speculative sampling
        exact, and this one is accepted with probability `p(token)`.
        """
        num_drafted = max(len(continuation) for continuation in continuations)
        self.open_slots(num_drafted + 1)
        for row, length, continuation in zip(self.host_rows, self.host_lengths, continuations):
            proposal = continuation if len(continuation) else self.tokens[row, length - 1 : length]
            padding = proposal[-1:].expand(num_drafted - len(proposal))
            self.tokens[row, length : length + num_drafted] = torch.cat([proposal, padding])
        self.exit_query_cache = self._no_exit_states()
        if not self.do_sample:
            return num_drafted, None
        drafts = self.tokens[self.rows[:, None], self.lengths[:, None] + torch.arange(num_drafted, device=self.rows.device)]
        scores = torch.full((self.num_active, num_drafted, self.draft_exit.vocab_size), float("-inf"), device=drafts.device)
        return num_drafted, scores.scatter_(-1, drafts[..., None], 0.0)

    def _no_exit_states(self) -> torch.Tensor:
        """An empty exit-query cache `(num_active, 0, hidden_size)`: no draft step ran this round."""
        return self.tokens.new_zeros((self.num_active, 0, self.model.config.hidden_size), dtype=self.model.dtype)

    def verify(self, num_drafted: int) -> torch.Tensor:
        """The last layer's outputs `(num_active, num_drafted + 1, hidden_size)`, before the final norm, at the
        slots of each row's pending token and its drafts.

        Layers `0..E-1` run only on what no draft step has run: the last draft token (unless a withheld draft step
        has already run it), or every looked-up token and the pending one; layers `E..L-1` run on the exit-query cache
        plus those.
        """
        hidden = self.exit_query_cache  # one exit state per draft step run
        unrun = num_drafted + 1 - hidden.shape[1]
        if unrun > 0:
            positions = self.lengths[:, None] + (num_drafted - unrun + torch.arange(unrun, device=self.rows.device))
            unrun_tokens = self.tokens[self.rows[:, None], positions]  # (num_active, unrun)
            # A lookup round's pass varies in length: eager, not one compiled graph per length.
            unrun_states = self.run_layers(self.model.model.embed_tokens(unrun_tokens), 0, self.exit_layer, unrun == 1)
            hidden = torch.cat([hidden, unrun_states], 1)
        self.exit_query_cache = None
        # Compiled: padded to `d + 1` positions, one shape for every round (the padding's outputs are dropped, and its
        # cache entries lie beyond the slots kept).
        fixed_shape = self.verify_width is not None and self.round_width == self.verify_width
        if fixed_shape:
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, self.verify_width - hidden.shape[1]))
        final = self.run_layers(hidden, self.exit_layer, len(self.model.model.layers), fixed_shape)
        return final[:, : num_drafted + 1]

    def take_hidden_states(self, num_kept: int) -> list[tuple[torch.Tensor, ...]]:
        """Plain decoding's `hidden_states` for the one row's `num_kept` new tokens of this round, and forgets every
        recorded position up to them and beyond (rejected drafts).

        Per token, `num_hidden_layers + 1` tensors `(1, n, hidden_size)` at the position before it: the embeddings,
        then each layer's output, the last one normed (`None` where `output_hidden_states` does not select it). The
        call's first token also covers the prompt positions run here (n > 1), as plain decoding's first step does.
        """
        length = self.host_lengths[0]
        start, end = self.recorded_from, length + num_kept - 1
        layers = [torch.cat(pieces, dim=1)[:, : end - start] for pieces in self.layer_outputs]
        layers[-1] = self.model.model.norm(layers[-1])
        states = [self.model.model.embed_tokens(self.tokens[:, start:end]), *layers]
        if self.selected_hidden_states is not None:
            states = [state if i in self.selected_hidden_states else None for i, state in enumerate(states)]
        for pieces in self.layer_outputs:
            pieces.clear()
        self.recorded_from = end
        bounds = [start, *range(length, end + 1)]
        return [
            tuple(None if state is None else state[:, a - start : b - start] for state in states)
            for a, b in zip(bounds, bounds[1:])
        ]

    def advance(self, num_kept: list[int], finished: list[bool]) -> None:
        """Each active row keeps `num_kept` (one per active row) new tokens (already in `tokens`); `finished` rows
        leave. Host values: nothing here synchronises.

        A row's pending token and its first `num_kept - 1` new tokens stay in the cache; the cache keeps the most any
        remaining row keeps, and the rest of a row's round slots become holes.
        """
        start = self.filled
        kept = torch.tensor(num_kept, device=self.lengths.device)
        self.lengths = self.lengths + kept
        self.next_positions = self.next_positions + kept
        self.sequence_lengths[self.rows] = self.lengths
        self.host_lengths = [length + count for length, count in zip(self.host_lengths, num_kept)]
        if self.slot_mask is not None:
            self.valid_slots = [valid + count for valid, count in zip(self.valid_slots, num_kept)]
        if all(finished):
            self.slots.truncate(start + max(num_kept))  # one row: its cache holds all its tokens but the last
            self.rows, self.host_rows, self.host_lengths = self.rows[:0], [], []
            return
        if any(finished):
            remaining = [i for i, done in enumerate(finished) if not done]
            self._keep_rows(remaining)
            num_kept, kept = [num_kept[i] for i in remaining], kept[remaining]
        width = max(num_kept)
        self.slots.truncate(start + width)
        if self.slot_mask is not None:
            self.slot_mask[:, start : start + width] = torch.arange(width, device=kept.device) < kept[:, None]
        self.filled = start + width
        if self.batch_size > 1:
            self._compact_if_sparse()

    def rewind(self) -> None:
        """Forgets the current round: every cache layer holds the `filled` slots again."""
        self.slots.truncate(self.filled)
        self.exit_query_cache = None

    def _reserve(self, num_slots: int) -> None:
        """Grows the slot arrays to hold at least `num_slots` slots."""
        extra = num_slots - self.slot_positions.shape[1]
        if extra <= 0:
            return
        extra = max(extra, self.slot_positions.shape[1])  # doubling keeps growth rare
        self.slot_positions = torch.cat([self.slot_positions, self.slot_positions.new_zeros((self.num_active, extra))], 1)
        if self.slot_mask is not None:
            self.slot_mask = torch.cat([self.slot_mask, self.slot_mask.new_zeros((self.num_active, extra))], 1)

    def _keep_rows(self, remaining: list[int]) -> None:
        """Only the active rows `remaining` go on: every per-row tensor and the cache are narrowed to them."""
        self.host_rows = [self.host_rows[i] for i in remaining]
        self.host_lengths = [self.host_lengths[i] for i in remaining]
        if self.slot_mask is not None:
            self.valid_slots = [self.valid_slots[i] for i in remaining]
        keep = torch.tensor(remaining, device=self.rows.device)
        self.slots.select_rows(keep)
        self.rows, self.lengths, self.next_positions = self.rows[keep], self.lengths[keep], self.next_positions[keep]
        self.slot_positions = self.slot_positions[keep]
        if self.slot_mask is not None:
            self.slot_mask = self.slot_mask[keep]

    def _compact_if_sparse(self) -> None:
        """Compacts once the slots that are holes (or padding) in every row are a large part of the cache."""
        width = max(self.valid_slots)
        if self.filled - width >= max(_MIN_SLOTS_TO_COMPACT, _COMPACT_AT_HOLE_FRACTION * self.filled):
            self._compact()

    def _compact(self) -> None:
        """Drops the slots that are holes (or padding) in every row: each row's valid slots move, in order, to the
        right end of a narrower cache (left padding, as a padded prompt has)."""
        valid = self.slot_mask[:, : self.filled]  # (num_active, filled)
        width = max(self.valid_slots)
        offsets = width - torch.tensor(self.valid_slots, device=valid.device)  # (num_active,): padding slots first
        # Each row's valid slots, in order, then the rest (a stable sort): the `r`-th valid slot goes to slot
        # `offset + r`. The padding slots before take any entry; the mask hides them. Nothing synchronises.
        valid_first = torch.sort((~valid).int(), dim=-1, stable=True).indices
        ranks = (torch.arange(width, device=valid.device) - offsets[:, None]).clamp(min=0)  # (num_active, width)
        source = valid_first.gather(1, ranks)
        self.slots.move_slots(source)
        capacity = self.slot_mask.shape[1]
        positions = self.slot_positions.gather(1, source)
        self.slot_positions = torch.cat([positions, positions.new_zeros((self.num_active, capacity - width))], 1)
        slots = torch.arange(capacity, device=valid.device)
        self.slot_mask = (slots >= offsets[:, None]) & (slots < width)
        self.filled = width


def accept_greedy_rows(
    draft_tokens: torch.LongTensor, target_scores: torch.Tensor
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Per row, the longest prefix of `draft_tokens` `(rows, k)` the full model's argmax agrees with, on the device.

    `target_scores` `(rows, k + 1, vocab_size)`. Returns the numbers accepted `(rows,)` and the full model's tokens
    `(rows, k + 1)`, whose first `accepted + 1` are each row's new tokens.
    """
    target_tokens = target_scores.argmax(dim=-1)  # (rows, k + 1)
    agreeing = (draft_tokens == target_tokens[:, :-1]).long()
    return agreeing.cumprod(dim=-1).sum(dim=-1), target_tokens


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(p − q, 0)) `(vocab_size,)`: where a rejected draft token's replacement is drawn from."""
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    # A rejection needs p < q at the draft token, hence p > q elsewhere; only rounding can leave nothing here.
    # Chosen on the device: no synchronisation.
    return torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), target_probs)


def accept_speculative_sampling(
    draft_tokens: torch.LongTensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> tuple[int, torch.LongTensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the tokens follow `target_probs` exactly.

    Draft token i is kept with probability min(1, p_i / q_i) until the first rejection, which is replaced by a
    sample from norm(max(p − q, 0)); if all are kept, one more token is sampled from p.

    Args:
        draft_tokens: `(k,)`. draft_probs: `(k, vocab_size)`, q. target_probs: `(k + 1, vocab_size)`, p.

    Returns:
        The number of draft tokens kept and the new tokens `(kept + 1,)`.
    """
    num_drafted = len(draft_tokens)
    steps = torch.arange(num_drafted, device=draft_tokens.device)
    q = draft_probs[steps, draft_tokens]  # (k,)
    p = target_probs[steps, draft_tokens]  # (k,)
    # u < p/q, written without the division.
    kept = torch.rand(num_drafted, device=q.device) * q < p
    num_accepted = int(kept.long().cumprod(dim=0).sum())  # the row's one synchronisation
    if num_accepted < num_drafted:
        next_probs = residual_distribution(target_probs[num_accepted], draft_probs[num_accepted])
    else:
        next_probs = target_probs[num_drafted]
    next_token = torch.multinomial(next_probs, num_samples=1)  # (1,)
    return num_accepted, torch.cat([draft_tokens[:num_accepted], next_token])


def accept_sampled(draft_tokens, draft_scores, target_scores) -> tuple[int, torch.LongTensor]:
    """One row's speculative sampling: `draft_tokens` `(k,)`, processed `draft_scores` `(k, vocab_size)` (`None` when
    `k == 0`) and `target_scores` `(k + 1, vocab_size)` of the full model. Returns the number of drafts accepted and
    the new tokens `(accepted + 1,)`."""
    draft_probs = draft_scores.softmax(dim=-1) if draft_scores is not None else target_scores[:0]
    return accept_speculative_sampling(draft_tokens, draft_probs, target_scores.softmax(dim=-1))


# Stopping criteria that are pure functions of the tokens (and the clock): they can be called on a round's candidate
# tokens beyond where a row stops, so all of a round's calls are made before one synchronisation reads them. Others
# (a user's, which may keep state) are called token by token, exactly as plain decoding calls them.
_PURE_STOPPING_CRITERIA = (MaxLengthCriteria, MaxTimeCriteria, EosTokenCriteria, StopStringCriteria)


def accept_round(decoder, num_drafted, draft_scores, processed, do_sample, stopping_criteria, scores):
    """Acceptance and stopping of one round, for the active rows: writes each row's new tokens into
    `decoder.tokens` after its pending token, and returns, on the host, per row, the number of drafts accepted and
    the 1-based index of the first new token a stopping criterion fires on (a larger number where none does).

    `processed` holds each row's processed scores `(num_drafted + 1, vocab_size)`; `scores` the call's recorded scores
    so far, or `None`. Greedy acceptance writes the full model's `num_drafted + 1` tokens (the accepted drafts equal
    them), so that, with pure stopping criteria, nothing reaches the host before the round's one synchronisation.
    """
    tokens, rows, lengths = decoder.tokens, decoder.rows, decoder.lengths
    steps = torch.arange(num_drafted + 1, device=tokens.device)
    if do_sample:  # one synchronisation per row: the draw decides how many tokens the row gets
        num_accepted, num_candidates = [], []
        for i, (row, length) in enumerate(zip(decoder.host_rows, decoder.host_lengths)):
            accepted, new_tokens = accept_sampled(
                tokens[row, length : length + num_drafted], None if draft_scores is None else draft_scores[i], processed[i]
            )
            tokens[row, length : length + len(new_tokens)] = new_tokens
            num_accepted.append(accepted)
            num_candidates.append(len(new_tokens))
        device_accepted = None
    else:
        draft_tokens = tokens[rows[:, None], lengths[:, None] + steps[:-1]]  # (num_active, num_drafted)
        device_accepted, target_tokens = accept_greedy_rows(draft_tokens, torch.stack(processed))
        tokens[rows[:, None], lengths[:, None] + steps] = target_tokens
        num_candidates = [num_drafted + 1] * len(decoder.host_rows)
    if not all(isinstance(criterion, _PURE_STOPPING_CRITERIA) for criterion in stopping_criteria):
        num_accepted = device_accepted.tolist() if device_accepted is not None else num_accepted
        return num_accepted, [
            _first_stop(stopping_criteria, tokens[row : row + 1], length, processed[i], num_accepted[i] + 1, scores)
            for i, (row, length) in enumerate(zip(decoder.host_rows, decoder.host_lengths))
        ]
    fired = [
        torch.stack(
            [
                stopping_criteria(tokens[row : row + 1, : length + j], _scores_so_far(scores, processed[i], j))[0]
                for j in range(1, candidates + 1)
            ]
        )
        for i, (row, length, candidates) in enumerate(zip(decoder.host_rows, decoder.host_lengths, num_candidates))
    ]
    width = num_drafted + 1
    fired = torch.stack([torch.nn.functional.pad(row_fired, (0, width - len(row_fired))) for row_fired in fired])
    # The first firing token per row, 1-based; `width + 1` where none fires.
    first_stop = torch.where(fired.any(dim=-1), fired.int().argmax(dim=-1) + 1, width + 1)
    if device_accepted is None:
        return num_accepted, first_stop.tolist()
    host = torch.stack([device_accepted, first_stop]).tolist()  # the round's one synchronisation
    return host[0], host[1]


def _scores_so_far(scores, processed, count: int):
    """What plain decoding passes a stopping criterion at the `count`-th new token of a round: every new token's
    processed scores so far, or `None` without `output_scores`."""
    return None if scores is None else (*scores, *processed[:count].split(1))


def _first_stop(stopping_criteria, row_tokens, length: int, processed, num_new: int, scores) -> int:
    """Calls the criteria token by token on one row's `num_new` new tokens, as plain decoding does, and stops at the
    first that fires (one synchronisation per token); returns its 1-based index, or `num_new + 1`."""
    for count in range(1, num_new + 1):
        if stopping_criteria(row_tokens[:, : length + count], _scores_so_far(scores, processed, count)).any():
            return count
    return num_new + 1


def self_speculative_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    inputs_tensor=None,
    assistant_model=None,
    assistant_tokenizer=None,
    tokenizer=None,
    **model_kwargs,
):
    """The decoding loop behind `generate(assistant_early_exit=E)`; arguments as `GenerationMixin._assisted_decoding`.

    Returns the sequences `(batch_size, total_length)`, finished rows padded as plain decoding pads them, or a
    [`SelfSpeculativeOutput`] with `return_dict_in_generate=True`. The call's totals are also kept on
    `model.speculation_stats`.
    """
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("Self-speculative decoding needs `input_ids`; `inputs_embeds` is not supported.")
    if model_kwargs.get("exit_layer") is not None:
        raise ValueError("Pass either `exit_layer`/`early_exit` (lossy) or `assistant_early_exit` (lossless), not both.")
    cache = model_kwargs.get("cache")
    cache_slots(cache, model.config.num_hidden_layers, input_ids.shape[0])  # raises for a cache it cannot draft into
    compile_config = step_compile_config(model, generation_config, model_kwargs)
    padded_length = generation_config.max_length - 1 + generation_config.num_assistant_tokens
    generates_own_cache = not getattr(cache, "_is_user_defined", False)
    if compile_config is not None and generates_own_cache and cache.layers[0].max_cache_len < padded_length:
        # A static cache of `generate`'s own, sized for plain decoding: size it for padded verification too. It is
        # allocated on its first write, so nothing is wasted; later calls' caches get this size too, as `generate`
        # keeps it, so that shorter calls reuse the compiled steps.
        cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=padded_length)
        model._previous_max_cache_length = padded_length
    batch_size, prompt_length = input_ids.shape
    attention_mask = model_kwargs.get("attention_mask")
    validate_batch_request(batch_size, generation_config, logits_processor, stopping_criteria, streamer, attention_mask)
    do_sample = bool(generation_config.do_sample)
    output_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    output_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = ([] if output_scores else None), ([] if output_logits else None)
    counts = RowCounts(batch_size)

    decoder = SelfSpeculativeDecoder(
        model, generation_config, logits_processor, input_ids, cache, attention_mask, compile_config
    )
    tokens = decoder.tokens
    hidden_states = [] if decoder.layer_outputs is not None else None
    decoder.prefill()
    while decoder.num_active:
        round_start = time.perf_counter()
        num_drafted, draft_scores = decoder.draft()
        draft_steps = decoder.exit_query_cache.shape[1]
        final_hidden = decoder.verify(num_drafted)  # (num_active, num_drafted + 1, hidden_size)
        # One head call for every row and position: reading the head's weights dominates, not the number of rows.
        raw = model.exit_logits(final_hidden).float()
        rows, lengths = decoder.host_rows, decoder.host_lengths
        looked_up = num_drafted > 0 and draft_steps == 0
        counts.add_round(rows, num_drafted, draft_steps, looked_up)
        processed = [
            process_scores(decoder.row_processors[row], tokens[row : row + 1], length, raw[i])
            for i, (row, length) in enumerate(zip(rows, lengths))
        ]
        # Each row's candidate new tokens are written into `tokens`; how many it accepts and where it stops reach the
        # host together, in one synchronisation where the rule and the stopping criteria allow (see `accept_round`).
        num_accepted, stops = accept_round(
            decoder, num_drafted, draft_scores, processed, do_sample, stopping_criteria, scores
        )
        round_seconds = time.perf_counter() - round_start  # the round's work is done: its results are on the host
        num_kept, finished = [], []
        for i, (row, length) in enumerate(zip(rows, lengths)):
            row_tokens = tokens[row : row + 1]
            counts.accepted_tokens[row] += num_accepted[i]
            # Stop exactly where plain decoding would: after the first token any stopping criterion fires on.
            kept = min(num_accepted[i] + 1, stops[i])
            num_kept.append(kept)
            finished.append(stops[i] <= num_accepted[i] + 1)
            if scores is not None:
                scores.extend(processed[i][j : j + 1] for j in range(kept))
            counts.from_draft[row].extend(position < num_accepted[i] for position in range(kept))
            # What follows exists for one row only (`validate_batch_request`).
            if streamer is not None:
                streamer.put(row_tokens[:, length : length + kept].cpu())
            if raw_logits is not None:
                raw_logits.extend(raw[i, j : j + 1] for j in range(kept))
            if hidden_states is not None:
                hidden_states.extend(decoder.take_hidden_states(kept))
        if decoder.lookup_planner is not None:
            if looked_up:
                decoder.lookup_planner.record_lookup_round(
                    decoder.lookup_matches, num_accepted, num_drafted + 1, round_seconds
                )
            else:
                decoder.lookup_planner.record_other_round(len(rows), sum(num_kept), round_seconds)
        if decoder.exit_chooser is not None and not looked_up:
            decoder.exit_chooser.record(decoder.exit_layer, len(rows), num_drafted * len(rows), sum(num_accepted))
        decoder.advance(num_kept, finished)

    if streamer is not None:
        streamer.end()
    model.speculation_stats = counts.totals()
    sequences = padded_sequences(tokens, decoder.sequence_lengths, generation_config._pad_token_tensor)
    if not generation_config.return_dict_in_generate:
        return sequences
    new_length = sequences.shape[1] - prompt_length
    from_draft = torch.zeros((batch_size, new_length), dtype=torch.bool)
    for row, flags in enumerate(counts.from_draft):
        from_draft[row, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
    return SelfSpeculativeOutput(
        sequences=sequences,
        scores=tuple(scores) if scores is not None else None,
        logits=tuple(raw_logits) if raw_logits is not None else None,
        hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        # A batch's cache holds holes where rows rejected drafts: it does not continue as a plain cache would.
        cache=cache if batch_size == 1 else None,
        rounds=counts.rounds,
        drafted_tokens=counts.drafted_tokens,
        draft_steps=counts.draft_steps,
        accepted_tokens=counts.accepted_tokens,
        acceptance_rate=torch.tensor(
            [acceptance_rate(a, d) for a, d in zip(counts.accepted_tokens.tolist(), counts.drafted_tokens.tolist())]
        ),
        from_draft=from_draft,
    )


def padded_sequences(tokens: torch.LongTensor, lengths: torch.LongTensor, pad_token_id) -> torch.LongTensor:
    """`tokens` `(batch_size, max_length)` cut to the longest of `lengths` `(batch_size,)`, each row padded after its
    own length with `pad_token_id`, as plain batched decoding pads finished rows."""
    longest = int(lengths.max())
    sequences = tokens[:, :longest].clone()
    short = torch.arange(longest, device=tokens.device) >= lengths[:, None]
    if short.any():
        if pad_token_id is None:
            raise ValueError("Rows of the batch finished at different lengths: set `pad_token_id` to pad them.")
        sequences[short] = pad_token_id.to(tokens.device)
    return sequences
