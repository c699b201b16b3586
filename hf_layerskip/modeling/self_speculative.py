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
"""

import copy
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList, PrefixConstrainedLogitsProcessor
from transformers.generation.stopping_criteria import MaxLengthCriteria, MaxTimeCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

from .dynamic_drafting import ExitChooser

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
        # Drafts and rejections crop the cache: it must be a `DynamicCache`.
        "use_cache=False": generation_config.use_cache is False,
        f"cache_implementation={generation_config.cache_implementation!r}": generation_config.cache_implementation
        not in (None, "dynamic"),
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"`{name}` is not supported with self-speculative decoding (`assistant_early_exit`).")
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


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Crops every cache layer to its first `length` positions (layers may hold different lengths)."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)


def lookup_continuation(sequence: torch.LongTensor, max_ngram_size: int, num_tokens: int) -> torch.LongTensor:
    """Prompt lookup: the (up to) `num_tokens` tokens that followed the most recent earlier occurrence of the last `n`
    tokens of `sequence` `(length,)`, for the largest `n <= max_ngram_size` that occurred before; `(0,)` if none did."""
    length = len(sequence)
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        windows = sequence[: length - 1].unfold(0, n, 1)  # (length - n, n): every earlier n-gram with a successor
        hits = (windows == sequence[length - n :]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return sequence[start : start + num_tokens]
    return sequence[:0]


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

    def __init__(self, model, generation_config, logits_processor, input_ids, cache: DynamicCache, attention_mask):
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
        eos = getattr(generation_config, "_eos_token_tensor", None)  # set by `generate`
        self.eos_token_ids = None if eos is None else eos.flatten().to(input_ids.device)
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.row_processors = per_row_processors(logits_processor, input_ids.shape[0])  # indexed by batch row
        self.cache = cache
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
        self.sequence_lengths = self.lengths.clone()  # (batch_size,): final once a row has left
        if attention_mask is None and batch_size > 1:
            attention_mask = torch.ones_like(input_ids)
        capacity = self.max_length
        self.slot_positions = torch.arange(capacity, device=device).repeat(batch_size, 1)
        self.slot_mask = None  # nothing is padded: causal masking alone
        if attention_mask is not None:
            # As `generate` numbers them: 0, 1, ... over the real tokens, 0 at padding.
            prompt_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            self.slot_positions[:, :prompt_length] = prompt_positions
            self.slot_mask = torch.zeros((batch_size, capacity), dtype=torch.bool, device=device)
            self.slot_mask[:, :prompt_length] = attention_mask.bool()
        self.next_positions = self.slot_positions[:, prompt_length - 1].clone()  # (num_active,): of the pending tokens
        self.filled = 0
        rotary = model.model.rotary_emb
        # cos and sin, each (max_length, head_dim), indexed by position; a dict of them per layer type where the
        # model's rotary embedding differs by layer type (`position_embeddings`).
        self.rotary_tables = None
        if not any(kind in str(rotary.rope_type) for kind in _LENGTH_DEPENDENT_ROPE):
            all_positions = torch.arange(self.max_length, device=device)[None]
            tables = model.model.position_embeddings(model.model.embed_tokens.weight, all_positions)
            self.rotary_tables = tree_map(lambda table: table[0], tables)

    @property
    def num_active(self) -> int:
        return len(self.rows)

    def run_layers(self, hidden_states: torch.Tensor, first_layer: int, end_layer: int) -> torch.Tensor:
        """[`LayerSkipModelMixin.run_layers`] on the slots right after those the cache of `first_layer` holds.

        `hidden_states` `(num_active, query_length, hidden_size)` is the input of `first_layer`; returns the output of
        `end_layer - 1`, same shape. Records each layer's output with `output_hidden_states`.
        """
        start = self.cache.get_seq_length(first_layer)
        end = start + hidden_states.shape[1]
        position_ids = self.slot_positions[:, start:end]
        position_embeddings = None
        if self.rotary_tables is not None:
            position_embeddings = tree_map(lambda table: table[position_ids], self.rotary_tables)
        outputs = None if self.layer_outputs is None else []
        hidden_states = self.model.model.run_layers(
            hidden_states,
            first_layer,
            end_layer,
            position_ids,
            None if self.slot_mask is None else self.slot_mask[:, :end],
            self.cache,
            layer_outputs=outputs,
            position_embeddings=position_embeddings,
            key_positions=self.slot_positions[:, :end],  # sliding windows count positions, not slots (holes)
        )
        if outputs is not None:
            for layer, output in enumerate(outputs, first_layer):
                self.layer_outputs[layer].append(output)
        return hidden_states

    def prefill(self) -> None:
        """Every layer processes the prompt but its last token, which the first draft step takes.

        The cache may already hold a prefix of the prompt (an earlier turn's returned cache): only the rest is run.
        """
        num_layers = len(self.model.model.layers)
        cached = {self.cache.get_seq_length(layer) for layer in range(num_layers)}
        if len(cached) > 1:
            raise ValueError(f"Every cache layer must hold the same number of tokens, got {sorted(cached)}.")
        prompt_length = int(self.lengths[0])
        # A cache holding the whole prompt gives back its last token, which the first draft step processes.
        crop_cache(self.cache, prompt_length - 1)
        start = self.recorded_from = self.cache.get_seq_length()
        if start < prompt_length - 1:
            self.run_layers(self.model.model.embed_tokens(self.tokens[:, start : prompt_length - 1]), 0, num_layers)
        self.filled = prompt_length - 1

    def open_slots(self, count: int) -> None:
        """Slots `filled..filled+count-1` take each row's pending token and its next `count - 1` draft tokens."""
        start = self.filled
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

        Every row drafts while any row still proposes: a row stops proposing at a token its exit is less confident of
        than the threshold, or after drafting eos, but goes on drafting as long as the batch does (the step costs the
        batch nothing more, and verification still judges every draft). A step at which no row proposes is withheld:
        its token is not drafted, and verification goes on from its exit state, so no layer pass is lost.

        Returns the number of drafted tokens `k` and the processed draft scores `(num_active, k, vocab_size)`, or
        `None` when nothing was drafted.
        """
        rows, lengths, tokens = self.rows, self.lengths, self.tokens
        # The full model's token after the draft also has to fit in `max_length`.
        room = self.max_length - int(lengths.max()) - 1
        if self.num_lookup_tokens and room > 0:
            looked_up = [
                lookup_continuation(tokens[row, :length], self.lookup_ngram_size, min(self.num_lookup_tokens, room))
                for row, length in zip(rows.tolist(), lengths.tolist())
            ]
            if any(len(continuation) for continuation in looked_up):
                return self.draft_by_lookup(looked_up)
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
                        for i, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist()))
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
        for row, length, continuation in zip(self.rows.tolist(), self.lengths.tolist(), continuations):
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
        hidden = self.exit_query_cache
        unrun = self.filled + num_drafted + 1 - self.cache.get_seq_length(0)
        if unrun > 0:
            positions = self.lengths[:, None] + (num_drafted - unrun + torch.arange(unrun, device=self.rows.device))
            unrun_tokens = self.tokens[self.rows[:, None], positions]  # (num_active, unrun)
            hidden = torch.cat([hidden, self.run_layers(self.model.model.embed_tokens(unrun_tokens), 0, self.exit_layer)], 1)
        self.exit_query_cache = None
        return self.run_layers(hidden, self.exit_layer, len(self.model.model.layers))

    def take_hidden_states(self, num_kept: int) -> list[tuple[torch.Tensor, ...]]:
        """Plain decoding's `hidden_states` for the one row's `num_kept` new tokens of this round, and forgets every
        recorded position up to them and beyond (rejected drafts).

        Per token, `num_hidden_layers + 1` tensors `(1, n, hidden_size)` at the position before it: the embeddings,
        then each layer's output, the last one normed (`None` where `output_hidden_states` does not select it). The
        call's first token also covers the prompt positions run here (n > 1), as plain decoding's first step does.
        """
        length = int(self.lengths[0])
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

    def advance(self, num_kept: torch.LongTensor, finished: torch.BoolTensor) -> None:
        """Each active row keeps `num_kept` `(num_active,)` new tokens (already in `tokens`); `finished` rows leave.

        A row's pending token and its first `num_kept - 1` new tokens stay in the cache; the cache keeps the most any
        remaining row keeps, and the rest of a row's round slots become holes.
        """
        start = self.filled
        self.lengths = self.lengths + num_kept
        self.next_positions = self.next_positions + num_kept
        self.sequence_lengths[self.rows] = self.lengths
        if bool(finished.all()):
            crop_cache(self.cache, start + int(num_kept.max()))  # one row: its cache holds all its tokens but the last
            self.rows = self.rows[:0]
            return
        if bool(finished.any()):
            self._keep_rows((~finished).nonzero().squeeze(1))
            num_kept = num_kept[~finished]
        width = int(num_kept.max())
        crop_cache(self.cache, start + width)
        if self.slot_mask is not None:
            self.slot_mask[:, start : start + width] = torch.arange(width, device=num_kept.device) < num_kept[:, None]
        self.filled = start + width
        if self.batch_size > 1:
            self._compact_if_sparse()

    def rewind(self) -> None:
        """Forgets the current round: every cache layer holds the `filled` slots again."""
        crop_cache(self.cache, self.filled)
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

    def _keep_rows(self, keep: torch.LongTensor) -> None:
        """Only the active rows `keep` `(num_kept,)` go on: every per-row tensor and the cache are narrowed to them."""
        for layer in self.cache.layers:
            layer.batch_select_indices(keep)
        self.rows, self.lengths, self.next_positions = self.rows[keep], self.lengths[keep], self.next_positions[keep]
        self.slot_positions = self.slot_positions[keep]
        if self.slot_mask is not None:
            self.slot_mask = self.slot_mask[keep]

    def _compact_if_sparse(self) -> None:
        """Drops the slots that are holes (or padding) in every row once they are a large part of the cache: each
        row's valid slots move, in order, to the right end of a narrower cache (left padding, as a padded prompt has)."""
        valid = self.slot_mask[:, : self.filled]  # (num_active, filled)
        counts = valid.sum(dim=-1)
        width = int(counts.max())
        if self.filled - width < max(_MIN_SLOTS_TO_COMPACT, _COMPACT_AT_HOLE_FRACTION * self.filled):
            return
        offsets = width - counts  # (num_active,): padding slots before each row's valid ones
        row_index, slot_index = valid.nonzero(as_tuple=True)
        destination = (valid.long().cumsum(dim=-1) - 1 + offsets[:, None])[row_index, slot_index]
        source = torch.zeros((self.num_active, width), dtype=torch.long, device=valid.device)
        source[row_index, destination] = slot_index
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name)  # (num_active, num_heads, filled, head_dim)
                index = source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                setattr(layer, name, states.gather(2, index))
        capacity = self.slot_mask.shape[1]
        positions = self.slot_positions.gather(1, source)
        self.slot_positions = torch.cat([positions, positions.new_zeros((self.num_active, capacity - width))], 1)
        slots = torch.arange(capacity, device=valid.device)
        self.slot_mask = (slots >= offsets[:, None]) & (slots < width)
        self.filled = width


def accept_greedy(draft_tokens: torch.LongTensor, target_scores: torch.Tensor) -> tuple[int, torch.LongTensor]:
    """Longest prefix of `draft_tokens` `(k,)` the full model's argmax agrees with, plus its next token.

    `target_scores` `(k + 1, vocab_size)`. Returns the number accepted and the new tokens `(accepted + 1,)`.
    """
    target_tokens = target_scores.argmax(dim=-1)  # (k + 1,)
    mismatches = (draft_tokens != target_tokens[:-1]).nonzero()
    num_accepted = int(mismatches[0]) if len(mismatches) else len(draft_tokens)
    return num_accepted, target_tokens[: num_accepted + 1]


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(p − q, 0)) `(vocab_size,)`: where a rejected draft token's replacement is drawn from."""
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    # A rejection needs p < q at the draft token, hence p > q elsewhere; only rounding can leave nothing here.
    return residual / total if total > 0 else target_probs


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
    rejections = (~kept).nonzero()
    num_accepted = int(rejections[0]) if len(rejections) else num_drafted
    if num_accepted < num_drafted:
        next_probs = residual_distribution(target_probs[num_accepted], draft_probs[num_accepted])
    else:
        next_probs = target_probs[num_drafted]
    next_token = torch.multinomial(next_probs, num_samples=1)  # (1,)
    return num_accepted, torch.cat([draft_tokens[:num_accepted], next_token])


def accept(draft_tokens, draft_scores, target_scores, do_sample: bool) -> tuple[int, torch.LongTensor]:
    """One row's acceptance rule: `draft_tokens` `(k,)`, processed `draft_scores` `(k, vocab_size)` (`None` when
    `k == 0`) and `target_scores` `(k + 1, vocab_size)` of the full model. Returns the number of drafts accepted and
    the new tokens `(accepted + 1,)`."""
    if not do_sample:
        return accept_greedy(draft_tokens, target_scores)
    draft_probs = draft_scores.softmax(dim=-1) if draft_scores is not None else target_scores[:0]
    return accept_speculative_sampling(draft_tokens, draft_probs, target_scores.softmax(dim=-1))


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
    if type(cache) is not DynamicCache:
        raise ValueError(
            "Self-speculative decoding needs a `DynamicCache` (use_cache=True and the default cache), got "
            f"{type(cache).__name__}."
        )
    batch_size, prompt_length = input_ids.shape
    attention_mask = model_kwargs.get("attention_mask")
    validate_batch_request(batch_size, generation_config, logits_processor, stopping_criteria, streamer, attention_mask)
    do_sample = bool(generation_config.do_sample)
    output_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    output_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = ([] if output_scores else None), ([] if output_logits else None)
    counts = RowCounts(batch_size)

    decoder = SelfSpeculativeDecoder(model, generation_config, logits_processor, input_ids, cache, attention_mask)
    tokens = decoder.tokens
    hidden_states = [] if decoder.layer_outputs is not None else None
    decoder.prefill()
    while decoder.num_active:
        num_drafted, draft_scores = decoder.draft()
        draft_steps = decoder.exit_query_cache.shape[1]
        final_hidden = decoder.verify(num_drafted)  # (num_active, num_drafted + 1, hidden_size)
        # One head call for every row and position: reading the head's weights dominates, not the number of rows.
        raw = model.exit_logits(final_hidden).float()
        rows, lengths = decoder.rows.tolist(), decoder.lengths.tolist()
        looked_up = num_drafted > 0 and draft_steps == 0
        counts.add_round(rows, num_drafted, draft_steps, looked_up)
        accepted_before = int(counts.accepted_tokens.sum()) if decoder.exit_chooser is not None else 0
        num_kept, finished = torch.zeros_like(decoder.lengths), torch.zeros_like(decoder.rows, dtype=torch.bool)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            row_tokens = tokens[row : row + 1]
            processed = process_scores(decoder.row_processors[row], row_tokens, length, raw[i])
            num_accepted, new_tokens = accept(
                row_tokens[0, length : length + num_drafted],
                None if draft_scores is None else draft_scores[i],
                processed,
                do_sample,
            )
            counts.accepted_tokens[row] += num_accepted
            row_tokens[0, length : length + len(new_tokens)] = new_tokens
            # Stop exactly where plain decoding would: after the first token any stopping criterion fires on. As in
            # plain decoding, a criterion sees the tokens so far and the processed scores of every new token (`None`
            # unless `output_scores`).
            for kept in range(1, len(new_tokens) + 1):
                if scores is not None:
                    scores.append(processed[kept - 1 : kept])
                if stopping_criteria(row_tokens[:, : length + kept], None if scores is None else tuple(scores)).any():
                    finished[i] = True
                    break
            num_kept[i] = kept
            counts.from_draft[row].extend(position < num_accepted for position in range(kept))
            # What follows exists for one row only (`validate_batch_request`).
            if streamer is not None:
                streamer.put(row_tokens[:, length : length + kept].cpu())
            if raw_logits is not None:
                raw_logits.extend(raw[i, j : j + 1] for j in range(kept))
            if hidden_states is not None:
                hidden_states.extend(decoder.take_hidden_states(kept))
        if decoder.exit_chooser is not None and not looked_up:
            accepted = int(counts.accepted_tokens.sum()) - accepted_before
            decoder.exit_chooser.record(decoder.exit_layer, len(rows), num_drafted * len(rows), accepted)
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
