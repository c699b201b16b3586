"""Self-speculative decoding (LayerSkip, arXiv 2404.16710, section 5) over one shared KV cache.

Each round drafts up to `d` tokens with layers `0..E-1` and the model's own final norm and LM head, then
verifies them with layers `E..L-1` only:

- **prefill**: every layer processes the prompt but its last token;
- **draft**: layers `0..E-1` process one token at a time, writing their KV entries into *the* cache and keeping
  their outputs (the exit-query cache);
- **verify**: layers `0..E-1` process only the last draft token; layers `E..L-1` process the exit-query cache
  plus that token, in one pass. Nothing is computed twice;
- **accept**: the longest prefix the full model agrees with (greedy) or keeps (speculative sampling), plus one
  token of the full model; every cache layer is cropped to the accepted length.

Between rounds every cache layer holds all tokens but the last one. Greedy output equals plain greedy decoding
token for token; sampling is exact speculative sampling. This file travels with saved checkpoints as remote code.
"""

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

# Rotary types whose frequencies depend on how long the sequence is so far: their tables cannot be built up front.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def acceptance_rate(accepted_tokens: int, drafted_tokens: int) -> float:
    """Fraction of drafted tokens the full model accepted; 0 when nothing was drafted. The one definition, for the
    decoder's counts and every summary of them."""
    return accepted_tokens / drafted_tokens if drafted_tokens else 0.0


@dataclass
class SpeculationStats:
    """Counts of one self-speculative `generate` call."""

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # Passes through layers 0..E-1 and the draft's exit; more than `drafted_tokens` where a withheld draft's step ran.
    draft_steps: int = 0
    # Per new token: True where the early exit drafted it and the full model accepted it, False where the full
    # model's verification produced it.
    from_draft: list[bool] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return acceptance_rate(self.accepted_tokens, self.drafted_tokens)


@dataclass
class SelfSpeculativeOutput(GenerateDecoderOnlyOutput):
    r"""
    A [`GenerateDecoderOnlyOutput`] plus the speculation counts.

    rounds (`int`): draft-and-verify rounds. drafted_tokens (`int`): tokens drafted by the early exit.
    draft_steps (`int`): draft passes, those of withheld (unconfident) drafts included.
    accepted_tokens (`int`): drafted tokens the full model accepted. acceptance_rate (`float`): their ratio.
    from_draft (`torch.BoolTensor` of shape `(new_tokens,)`): which new tokens are accepted drafts (the rest come
    from verification).
    """

    rounds: int | None = None
    drafted_tokens: int | None = None
    draft_steps: int | None = None
    accepted_tokens: int | None = None
    acceptance_rate: float | None = None
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
    if generation_mode != GenerationMode.ASSISTED_GENERATION:
        raise ValueError(
            "Self-speculative decoding (`assistant_early_exit`) supports greedy decoding and sampling with "
            f"num_beams=1, got generation mode {generation_mode!r} (num_beams={generation_config.num_beams})."
        )
    unsupported = {
        "assistant_model": generation_mode_kwargs.get("assistant_model") is not None,
        "prompt_lookup_num_tokens": generation_config.prompt_lookup_num_tokens is not None,
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


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Crops every cache layer to its first `length` positions (layers may hold different lengths)."""
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess > 0:
            layer.crop(-excess)


def _select(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """Next token from processed scores `(1, vocab_size)` -> `(1,)`."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
    return scores.argmax(dim=-1)


class SelfSpeculativeDecoder:
    """One sequence's self-speculative decoding: the tokens, the shared KV cache, the draft and the exit-query cache.

    `tokens` `(1, max_length)` holds the accepted tokens, then the current draft; slices of it serve as `input_ids`,
    so nothing is concatenated per token. Positions, rotary tables and the padding mask are built once for every
    position the call can reach. `exit_query_cache` `(1, num_drafted, hidden_size)` holds the exit layer's outputs for
    the drafted positions, which layers `E..L-1` have not processed yet; `verify` consumes it.

    With `output_hidden_states`, `layer_outputs` keeps each layer's outputs, in pieces, for the positions from
    `recorded_from` on; `take_hidden_states` turns the accepted ones into what plain decoding returns.
    """

    def __init__(self, model, generation_config, logits_processor, input_ids, cache: DynamicCache, attention_mask):
        self.model = model
        self.exit_layer = generation_config.assistant_early_exit
        self.draft_exit = model.draft_exit(self.exit_layer)
        self.num_speculations = generation_config.num_assistant_tokens
        self.confidence_threshold = generation_config.assistant_confidence_threshold or 0.0
        eos = getattr(generation_config, "_eos_token_tensor", None)  # set by `generate`
        self.eos_token_ids = set() if eos is None else set(eos.flatten().tolist())
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.cache = cache
        self.exit_query_cache: torch.Tensor | None = None
        record = generation_config.return_dict_in_generate and generation_config.output_hidden_states
        self.layer_outputs = [[] for _ in model.model.layers] if record else None
        self.recorded_from = 0
        # `output_hidden_states` may select hidden states by index; the others are `None`, as plain decoding gives them.
        selected = selected_hidden_states(generation_config.output_hidden_states)
        self.selected_hidden_states = None if selected is None else resolve_hidden_states_indices(model.model, selected)

        prompt_length, max_length = input_ids.shape[1], generation_config.max_length
        self.tokens = input_ids.new_zeros((1, max_length))  # `generate` has checked that the prompt is shorter
        self.tokens[:, :prompt_length] = input_ids
        if attention_mask is None:
            self.padding_mask = None  # nothing is padded: causal masking alone
            self.position_ids = torch.arange(max_length, device=input_ids.device)[None]
        else:
            generated = attention_mask.new_ones((1, max_length - prompt_length))
            self.padding_mask = torch.cat([attention_mask, generated], dim=1)  # (1, max_length)
            # As `generate` numbers them: 0, 1, ... over the real tokens, 0 at padding.
            self.position_ids = (self.padding_mask.long().cumsum(-1) - 1).masked_fill(self.padding_mask == 0, 0)
        rotary = model.model.rotary_emb
        self.rotary_tables = None  # cos and sin, each (1, max_length, head_dim)
        if not any(kind in str(rotary.rope_type) for kind in _LENGTH_DEPENDENT_ROPE):
            self.rotary_tables = rotary(model.model.embed_tokens.weight, self.position_ids)

    def run_layers(self, hidden_states: torch.Tensor, first_layer: int, end_layer: int) -> torch.Tensor:
        """[`LayerSkipLlamaModel.run_layers`] on the positions right after those the cache of `first_layer` holds.

        `hidden_states` `(1, query_length, hidden_size)` is the input of `first_layer`; returns the output of
        `end_layer - 1`, same shape. Records each layer's output with `output_hidden_states`.
        """
        start = self.cache.get_seq_length(first_layer)
        end = start + hidden_states.shape[1]
        position_embeddings = None
        if self.rotary_tables is not None:
            position_embeddings = tuple(table[:, start:end] for table in self.rotary_tables)
        outputs = None if self.layer_outputs is None else []
        hidden_states = self.model.model.run_layers(
            hidden_states,
            first_layer,
            end_layer,
            self.position_ids[:, start:end],
            None if self.padding_mask is None else self.padding_mask[:, :end],
            self.cache,
            layer_outputs=outputs,
            position_embeddings=position_embeddings,
        )
        if outputs is not None:
            for layer, output in enumerate(outputs, first_layer):
                self.layer_outputs[layer].append(output)
        return hidden_states

    def prefill(self, prompt_length: int) -> None:
        """Every layer processes the prompt but its last token, which the first draft step takes.

        The cache may already hold a prefix of the prompt (an earlier turn's returned cache): only the rest is run.
        """
        num_layers = len(self.model.model.layers)
        cached = {self.cache.get_seq_length(layer) for layer in range(num_layers)}
        if len(cached) > 1:
            raise ValueError(f"Every cache layer must hold the same number of tokens, got {sorted(cached)}.")
        # A cache holding the whole prompt gives back its last token, which the first draft step processes.
        crop_cache(self.cache, prompt_length - 1)
        start = self.recorded_from = self.cache.get_seq_length()
        if start < prompt_length - 1:
            self.run_layers(self.model.model.embed_tokens(self.tokens[:, start : prompt_length - 1]), 0, num_layers)

    def draft_step(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token `position - 1` through layers `0..E-1` and the draft's exit.

        Returns the exit layer's output `(1, 1, hidden_size)` and the raw float scores `(1, vocab_size)` of the token
        at `position`.
        """
        hidden = self.model.model.embed_tokens(self.tokens[:, position - 1 : position])  # (1, 1, hidden_size)
        hidden = self.run_layers(hidden, 0, self.exit_layer)
        return hidden, self.draft_exit(hidden[:, -1])

    def draft(self, cur_len: int) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Drafts after `tokens[:, :cur_len]`, whose last token no layer has processed yet.

        Returns the candidate ids `(1, cur_len + num_drafted)` (a view of `tokens`) and the processed draft scores
        `(1, num_drafted, vocab_size)`, or `None` when nothing was drafted.
        """
        tokens = self.tokens
        # The full model's token after the draft also has to fit in `max_length`.
        budget = min(self.num_speculations, tokens.shape[1] - cur_len - 1)
        exit_states, draft_scores = [], []
        for position in range(cur_len, cur_len + max(budget, 0)):
            hidden, scores = self.draft_step(position)
            exit_states.append(hidden)
            if self.logits_processor:
                scores = self.logits_processor(tokens[:, :position], scores)
            # A token the exit is unsure of is not proposed. Its step is not lost: the exit state of the token before
            # it stays in the exit-query cache, and verification goes on from there.
            if self.confidence_threshold > 0 and scores.softmax(dim=-1).max() < self.confidence_threshold:
                break
            token = _select(scores, self.do_sample)
            tokens[:, position] = token
            draft_scores.append(scores)
            if self.eos_token_ids and int(token) in self.eos_token_ids:
                break
        if exit_states:
            self.exit_query_cache = torch.cat(exit_states, dim=1)
        else:
            self.exit_query_cache = tokens.new_zeros((1, 0, self.model.config.hidden_size), dtype=self.model.dtype)
        candidate_ids = tokens[:, : cur_len + len(draft_scores)]
        return candidate_ids, torch.stack(draft_scores, dim=1) if draft_scores else None

    def verify(self, candidate_ids: torch.LongTensor) -> torch.Tensor:
        """The last layer's outputs `(1, num_drafted + 1, hidden_size)`, before the final norm, at the positions of the
        last accepted token and the drafted ones.

        Layers `0..E-1` run only on the last candidate token, unless a withheld draft step has already run them;
        layers `E..L-1` run on the exit-query cache plus it.
        """
        hidden = self.exit_query_cache
        if self.cache.get_seq_length(0) < candidate_ids.shape[1]:
            last = self.model.model.embed_tokens(candidate_ids[:, -1:])  # (1, 1, hidden_size)
            hidden = torch.cat([hidden, self.run_layers(last, 0, self.exit_layer)], dim=1)
        self.exit_query_cache = None
        return self.run_layers(hidden, self.exit_layer, len(self.model.model.layers))  # (1, num_drafted + 1, ...)

    def take_hidden_states(self, cur_len: int, num_kept: int) -> list[tuple[torch.Tensor, ...]]:
        """Plain decoding's `hidden_states` for the `num_kept` new tokens from position `cur_len` on, and forgets every
        recorded position up to them and beyond (rejected drafts).

        Per token, `num_hidden_layers + 1` tensors `(1, n, hidden_size)` at the position before it: the embeddings,
        then each layer's output, the last one normed (`None` where `output_hidden_states` does not select it). The
        call's first token also covers the prompt positions run here (n > 1), as plain decoding's first step does.
        """
        start, end = self.recorded_from, cur_len + num_kept - 1
        layers = [torch.cat(pieces, dim=1)[:, : end - start] for pieces in self.layer_outputs]
        layers[-1] = self.model.model.norm(layers[-1])
        states = [self.model.model.embed_tokens(self.tokens[:, start:end]), *layers]
        if self.selected_hidden_states is not None:
            states = [state if i in self.selected_hidden_states else None for i, state in enumerate(states)]
        for pieces in self.layer_outputs:
            pieces.clear()
        self.recorded_from = end
        bounds = [start, *range(cur_len, end + 1)]
        return [
            tuple(None if state is None else state[:, a - start : b - start] for state in states)
            for a, b in zip(bounds, bounds[1:])
        ]

    def keep(self, length: int) -> None:
        """Keeps `tokens[:, :length]`: every cache layer holds all of them but the last, which the next draft takes."""
        crop_cache(self.cache, length - 1)


def full_model_scores(model, final_hidden, candidate_ids, cur_len, logits_processor):
    """Raw and processed full-model scores `(num_drafted + 1, vocab_size)` for every verified position.

    `final_hidden` `(1, num_drafted + 1, hidden_size)` comes from `verify`; row `i` predicts the token after
    `candidate_ids[:, : cur_len + i]`.
    """
    raw = model.exit_logits(final_hidden[0]).float()
    if not logits_processor:
        return raw, raw
    processed = [logits_processor(candidate_ids[:, : cur_len + i], raw[i : i + 1]) for i in range(len(raw))]
    return raw, torch.cat(processed)


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


def accept(model, final_hidden, candidate_ids, cur_len, draft_scores, logits_processor, do_sample: bool):
    """Scores the verified positions and applies the acceptance rule.

    Args:
        final_hidden: `(1, num_drafted + 1, hidden_size)` from `verify`.
        candidate_ids: `(1, cur_len + num_drafted)`. draft_scores: `(1, num_drafted, vocab_size)` or `None`.

    Returns:
        The number of draft tokens accepted, the new tokens `(accepted + 1,)`, and the raw and processed scores
        `(num_drafted + 1, vocab_size)` of every verified position.
    """
    num_drafted = candidate_ids.shape[1] - cur_len
    draft_tokens = candidate_ids[0, cur_len:]  # (num_drafted,)
    # One head call for every position: reading the head's weights dominates, not the number of rows.
    raw, processed = full_model_scores(model, final_hidden, candidate_ids, cur_len, logits_processor)
    if do_sample:
        draft_probs = draft_scores[0].softmax(dim=-1) if num_drafted else processed[:0]
        num_accepted, new_tokens = accept_speculative_sampling(draft_tokens, draft_probs, processed.softmax(dim=-1))
    else:
        num_accepted, new_tokens = accept_greedy(draft_tokens, processed)
    return num_accepted, new_tokens, raw, processed


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

    Returns the sequences `(1, total_length)`, or a [`SelfSpeculativeOutput`] with `return_dict_in_generate=True`.
    The counts are also kept on `model.speculation_stats`.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"Self-speculative decoding supports batch size 1, got {input_ids.shape[0]}: call `generate` per sequence."
        )
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
    do_sample = bool(generation_config.do_sample)
    output_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    output_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = ([] if output_scores else None), ([] if output_logits else None)
    stats = SpeculationStats()

    decoder = SelfSpeculativeDecoder(
        model, generation_config, logits_processor, input_ids, cache, model_kwargs.get("attention_mask")
    )
    tokens, cur_len = decoder.tokens, input_ids.shape[1]
    hidden_states = [] if decoder.layer_outputs is not None else None
    decoder.prefill(cur_len)
    finished = False
    while not finished:
        candidate_ids, draft_scores = decoder.draft(cur_len)
        stats.draft_steps += decoder.exit_query_cache.shape[1]
        final_hidden = decoder.verify(candidate_ids)  # (1, num_drafted + 1, hidden_size)
        num_accepted, new_tokens, raw, processed = accept(
            model, final_hidden, candidate_ids, cur_len, draft_scores, logits_processor, do_sample
        )
        stats.rounds += 1
        stats.drafted_tokens += candidate_ids.shape[1] - cur_len
        stats.accepted_tokens += num_accepted
        tokens[0, cur_len : cur_len + len(new_tokens)] = new_tokens

        # Stop exactly where plain decoding would: after the first token any stopping criterion fires on. As in plain
        # decoding, a criterion sees the tokens so far and the processed scores of every new token (`None` unless
        # `output_scores`).
        for num_kept in range(1, len(new_tokens) + 1):
            if scores is not None:
                scores.append(processed[num_kept - 1 : num_kept])
            if stopping_criteria(tokens[:, : cur_len + num_kept], None if scores is None else tuple(scores)).any():
                finished = True
                break
        if streamer is not None:
            streamer.put(tokens[:, cur_len : cur_len + num_kept].cpu())
        if raw_logits is not None:
            raw_logits.extend(raw[i : i + 1] for i in range(num_kept))
        if hidden_states is not None:
            hidden_states.extend(decoder.take_hidden_states(cur_len, num_kept))
        stats.from_draft.extend(position < num_accepted for position in range(num_kept))
        cur_len += num_kept
        decoder.keep(cur_len)

    if streamer is not None:
        streamer.end()
    model.speculation_stats = stats
    sequences = tokens[:, :cur_len].clone()
    if not generation_config.return_dict_in_generate:
        return sequences
    return SelfSpeculativeOutput(
        sequences=sequences,
        scores=tuple(scores) if scores is not None else None,
        logits=tuple(raw_logits) if raw_logits is not None else None,
        hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        cache=cache,
        rounds=stats.rounds,
        drafted_tokens=stats.drafted_tokens,
        draft_steps=stats.draft_steps,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        from_draft=torch.tensor(stats.from_draft, dtype=torch.bool),
    )
