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
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask

# Rotary types whose frequencies depend on how long the sequence is so far: their tables cannot be built up front.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class SpeculationStats:
    """Counts of one self-speculative `generate` call."""

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    # Per new token: True where the early exit drafted it and the full model accepted it, False where the full
    # model's verification produced it.
    from_draft: list[bool] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass
class SelfSpeculativeOutput(GenerateDecoderOnlyOutput):
    r"""
    A [`GenerateDecoderOnlyOutput`] plus the speculation counts.

    rounds (`int`): draft-and-verify rounds. drafted_tokens (`int`): tokens drafted by the early exit.
    accepted_tokens (`int`): drafted tokens the full model accepted. acceptance_rate (`float`): their ratio.
    from_draft (`torch.BoolTensor` of shape `(new_tokens,)`): which new tokens are accepted drafts (the rest come
    from verification).
    """

    rounds: int | None = None
    drafted_tokens: int | None = None
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
        "output_attentions": bool(generation_config.output_attentions),
        "output_hidden_states": bool(generation_config.output_hidden_states),
        "synced_gpus": bool(generation_mode_kwargs.get("synced_gpus")),
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


class DecodingState:
    """One sequence's tokens, shared KV cache, positions and padding mask, laid out up to `max_length` once.

    `tokens` `(1, max_length)` holds the accepted tokens, then the current draft; slices of it serve as `input_ids`,
    so nothing is concatenated per token. Positions, rotary tables and the padding mask are built once for every
    position the call can reach.
    """

    def __init__(self, model, input_ids: torch.LongTensor, cache: DynamicCache, attention_mask, max_length: int):
        self.model = model
        self.layers = list(model.model.layers)
        self.cache = cache
        prompt_length = input_ids.shape[1]
        self.tokens = input_ids.new_zeros((1, max_length))  # `generate` has checked that the prompt is shorter
        self.tokens[:, :prompt_length] = input_ids
        if attention_mask is None:
            self.padding_mask = None  # nothing is padded: causal masking alone
            self.position_ids = torch.arange(self.tokens.shape[1], device=input_ids.device)[None]
        else:
            generated = attention_mask.new_ones((1, self.tokens.shape[1] - prompt_length))
            self.padding_mask = torch.cat([attention_mask, generated], dim=1)  # (1, max_length)
            # As `generate` numbers them: 0, 1, ... over the real tokens, 0 at padding.
            self.position_ids = (self.padding_mask.long().cumsum(-1) - 1).masked_fill(self.padding_mask == 0, 0)
        rotary = model.model.rotary_emb
        self.rotary_tables = None  # cos and sin, each (1, max_length, head_dim)
        if not any(kind in str(rotary.rope_type) for kind in _LENGTH_DEPENDENT_ROPE):
            self.rotary_tables = rotary(model.model.embed_tokens.weight, self.position_ids)

    def run(self, hidden_states: torch.Tensor, first_layer: int, end_layer: int) -> torch.Tensor:
        """Runs layers `first_layer..end_layer-1` on the positions right after those their cache holds.

        `hidden_states` `(1, query_length, hidden_size)` is the input of `first_layer`; returns the output of
        `end_layer - 1`, same shape.
        """
        start = self.cache.get_seq_length(first_layer)
        end = start + hidden_states.shape[1]
        position_ids = self.position_ids[:, start:end]  # (1, query_length)
        if self.rotary_tables is None:
            position_embeddings = self.model.model.rotary_emb(hidden_states, position_ids)
        else:
            position_embeddings = tuple(table[:, start:end] for table in self.rotary_tables)
        # One query attends to the whole cache: no mask unless something is padded.
        mask = None
        if self.padding_mask is not None or hidden_states.shape[1] > 1:
            mask = create_causal_mask(
                config=self.model.config,
                inputs_embeds=hidden_states,
                attention_mask=None if self.padding_mask is None else self.padding_mask[:, :end],
                cache=self.cache,
                position_ids=position_ids,
                layer_idx=first_layer,
            )
        for decoder_layer in self.layers[first_layer:end_layer]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_ids=position_ids,
                cache=self.cache,
                position_embeddings=position_embeddings,
            )
        return hidden_states

    def crop(self, length: int) -> None:
        """Crops every cache layer to its first `length` positions."""
        for layer in self.cache.layers:
            excess = layer.get_seq_length() - length
            if excess > 0:
                layer.crop(-excess)


def _select(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """Next token from processed scores `(1, vocab_size)` -> `(1,)`."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
    return scores.argmax(dim=-1)


class SelfSpeculativeCandidateGenerator(CandidateGenerator):
    """Drafts tokens with the model's first `assistant_early_exit` layers, sharing the model's KV cache.

    After `get_candidates`, `exit_query_cache` `(1, num_drafted, hidden_size)` holds the exit layer's outputs for
    the positions the deeper layers have not processed yet.
    """

    def __init__(self, model, generation_config, logits_processor):
        self.model = model
        self.exit_layer = generation_config.assistant_early_exit
        self.num_speculations = generation_config.num_assistant_tokens
        self.confidence_threshold = generation_config.assistant_confidence_threshold or 0.0
        eos = generation_config._eos_token_tensor
        self.eos_token_ids = set() if eos is None else set(eos.flatten().tolist())
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.state: DecodingState | None = None
        self.exit_query_cache: torch.Tensor | None = None

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Drafts after `input_ids` `(1, sequence_length)`, a prefix of `state.tokens` whose last token no layer has
        processed yet.

        Returns the extended ids `(1, sequence_length + num_drafted)` (a view of `state.tokens`) and the processed
        draft scores `(1, num_drafted, vocab_size)`, or `None` when nothing was drafted.
        """
        tokens, cur_len = self.state.tokens, input_ids.shape[1]
        # The full model's token after the draft also has to fit in `max_length`.
        budget = min(self.num_speculations, tokens.shape[1] - cur_len - 1)
        exit_states, draft_scores = [], []
        for position in range(cur_len, cur_len + max(budget, 0)):
            hidden = self.model.model.embed_tokens(tokens[:, position - 1 : position])  # (1, 1, hidden_size)
            hidden = self.state.run(hidden, 0, self.exit_layer)
            exit_states.append(hidden)
            scores = self.model.exit_logits(hidden[:, -1]).float()  # (1, vocab_size)
            if self.logits_processor:
                scores = self.logits_processor(tokens[:, :position], scores)
            token = _select(scores, self.do_sample)
            tokens[:, position] = token
            draft_scores.append(scores)
            if self.eos_token_ids and int(token) in self.eos_token_ids:
                break
            if self.confidence_threshold > 0 and scores.softmax(dim=-1).max() < self.confidence_threshold:
                break
        if exit_states:
            self.exit_query_cache = torch.cat(exit_states, dim=1)
        else:
            self.exit_query_cache = tokens.new_zeros((1, 0, self.model.config.hidden_size), dtype=self.model.dtype)
        candidate_ids = tokens[:, : cur_len + len(exit_states)]
        return candidate_ids, torch.stack(draft_scores, dim=1) if draft_scores else None


def verify(generator: SelfSpeculativeCandidateGenerator, candidate_ids: torch.LongTensor) -> torch.Tensor:
    """The last layer's outputs `(1, num_drafted + 1, hidden_size)`, before the final norm, at the positions of the
    last accepted token and the drafted ones.

    Layers `0..E-1` run only on the last candidate token; layers `E..L-1` run on the exit-query cache plus it.
    """
    model, state, exit_layer = generator.model, generator.state, generator.exit_layer
    hidden = model.model.embed_tokens(candidate_ids[:, -1:])  # (1, 1, hidden_size)
    hidden = state.run(hidden, 0, exit_layer)
    hidden = torch.cat([generator.exit_query_cache, hidden], dim=1)  # (1, num_drafted + 1, hidden_size)
    generator.exit_query_cache = None
    return state.run(hidden, exit_layer, model.config.num_hidden_layers)


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
    cache = model_kwargs.get("cache")
    if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
        raise ValueError(
            "Self-speculative decoding needs a fresh `DynamicCache` (use_cache=True and the default cache), got "
            f"{type(cache).__name__}{' holding tokens' if isinstance(cache, DynamicCache) else ''}."
        )
    do_sample = bool(generation_config.do_sample)
    output_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    output_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores, raw_logits = ([] if output_scores else None), ([] if output_logits else None)

    generator = model._get_candidate_generator(
        generation_config=generation_config,
        input_ids=input_ids,
        inputs_tensor=inputs_tensor,
        logits_processor=logits_processor,
        model_kwargs=model_kwargs,
    )
    state = DecodingState(model, input_ids, cache, model_kwargs.get("attention_mask"), generation_config.max_length)
    generator.state = state
    stats = SpeculationStats()
    num_layers = model.config.num_hidden_layers
    tokens, cur_len = state.tokens, input_ids.shape[1]

    # Prefill: every layer processes the prompt but its last token, which the first draft step takes.
    if cur_len > 1:
        state.run(model.model.embed_tokens(tokens[:, : cur_len - 1]), 0, num_layers)

    finished = False
    while not finished:
        # Draft.
        candidate_ids, draft_scores = generator.get_candidates(tokens[:, :cur_len])
        # Verify.
        final_hidden = verify(generator, candidate_ids)  # (1, num_drafted + 1, hidden_size)
        # Accept.
        num_accepted, new_tokens, raw, processed = accept(
            model, final_hidden, candidate_ids, cur_len, draft_scores, logits_processor, do_sample
        )
        stats.rounds += 1
        stats.drafted_tokens += candidate_ids.shape[1] - cur_len
        stats.accepted_tokens += num_accepted
        tokens[0, cur_len : cur_len + len(new_tokens)] = new_tokens

        # Stop exactly where plain decoding would: after the first token any stopping criterion fires on.
        for num_kept in range(1, len(new_tokens) + 1):
            if stopping_criteria(tokens[:, : cur_len + num_kept], None).any():
                finished = True
                break
        if streamer is not None:
            streamer.put(tokens[:, cur_len : cur_len + num_kept].cpu())
        if scores is not None:
            scores.extend(processed[i : i + 1] for i in range(num_kept))
        if raw_logits is not None:
            raw_logits.extend(raw[i : i + 1] for i in range(num_kept))
        stats.from_draft.extend(position < num_accepted for position in range(num_kept))
        cur_len += num_kept
        # Every layer keeps all tokens but the last, which the next round's first draft step processes.
        state.crop(cur_len - 1)

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
        cache=cache,
        rounds=stats.rounds,
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
        from_draft=torch.tensor(stats.from_draft, dtype=torch.bool),
    )
