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

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class SpeculationStats:
    """Counts of one self-speculative `generate` call."""

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

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
    """

    rounds: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    acceptance_rate: float | None = None


def validate_self_speculative_request(model, generation_mode, generation_config, generation_mode_kwargs) -> None:
    """Raises a `ValueError` for every setting self-speculative decoding does not support."""
    num_layers = model.config.num_hidden_layers
    exit_layer = generation_config.assistant_early_exit
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer < num_layers:
        raise ValueError(f"`assistant_early_exit` must be an integer in [1, {num_layers - 1}], got {exit_layer!r}.")
    num_speculations = generation_config.num_assistant_tokens
    if not isinstance(num_speculations, int) or num_speculations < 1:
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
            f"Self-speculative decoding drafts a constant number of tokens (num_assistant_tokens_schedule='constant'); "
            f"got num_assistant_tokens_schedule={schedule!r}."
        )


class DecodingState:
    """The shared cache and padding mask of one sequence, and the positions they imply."""

    def __init__(self, model, cache: DynamicCache, attention_mask: torch.Tensor | None):
        self.model = model
        self.cache = cache
        self.attention_mask = attention_mask  # (1, sequence_length) or None when nothing is padded

    def extend_mask(self, length: int) -> None:
        if self.attention_mask is not None and self.attention_mask.shape[1] < length:
            ones = self.attention_mask.new_ones((1, length - self.attention_mask.shape[1]))
            self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)

    def run(self, hidden_states: torch.Tensor, first_layer: int, end_layer: int) -> torch.Tensor:
        """Runs layers `first_layer..end_layer-1` on the positions after those their cache holds."""
        start = self.cache.get_seq_length(first_layer)
        end = start + hidden_states.shape[1]
        self.extend_mask(end)
        if self.attention_mask is None:
            position_ids = torch.arange(start, end, device=hidden_states.device)[None]  # (1, query_length)
            mask = None
        else:
            position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]
            mask = self.attention_mask[:, :end]
        return self.model.model.run_layers(hidden_states, first_layer, end_layer, position_ids, mask, self.cache)

    def crop(self, length: int) -> None:
        """Crops every cache layer to its first `length` positions."""
        for layer in self.cache.layers:
            excess = layer.get_seq_length() - length
            if excess > 0:
                layer.crop(-excess)


def _select(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """Next token from processed scores `(1, vocab_size)` -> `(1, 1)`."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)
    return scores.argmax(dim=-1, keepdim=True)


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
        self.max_length = generation_config.max_length
        self.eos_token_id = generation_config._eos_token_tensor
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.state: DecodingState | None = None
        self.exit_query_cache: torch.Tensor | None = None

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Drafts after `input_ids` `(1, sequence_length)`, whose last token no layer has processed yet.

        Returns the extended ids `(1, sequence_length + num_drafted)` and the processed draft scores
        `(1, num_drafted, vocab_size)`, or `None` when nothing was drafted.
        """
        # The bonus token of verification also counts towards `max_length`.
        budget = min(self.num_speculations, self.max_length - input_ids.shape[1] - 1)
        exit_states, draft_scores = [], []
        for _ in range(max(budget, 0)):
            hidden = self.model.model.embed_tokens(input_ids[:, -1:])  # (1, 1, hidden_size)
            hidden = self.state.run(hidden, 0, self.exit_layer)
            exit_states.append(hidden)
            logits = self.model.exit_logits(hidden[:, -1]).float()  # (1, vocab_size)
            scores = self.logits_processor(input_ids, logits)
            token = _select(scores, self.do_sample)  # (1, 1)
            draft_scores.append(scores)
            input_ids = torch.cat([input_ids, token], dim=1)
            if self.eos_token_id is not None and torch.isin(token, self.eos_token_id).any():
                break
            if self.confidence_threshold > 0 and scores.softmax(dim=-1).max() < self.confidence_threshold:
                break
        hidden_size = self.model.config.hidden_size
        self.exit_query_cache = (
            torch.cat(exit_states, dim=1) if exit_states else input_ids.new_zeros((1, 0, hidden_size), dtype=self.model.dtype)
        )
        return input_ids, torch.stack(draft_scores, dim=1) if draft_scores else None


def verify(generator: SelfSpeculativeCandidateGenerator, candidate_ids: torch.LongTensor) -> torch.Tensor:
    """Full-model logits `(1, num_drafted + 1, vocab_size)` for the positions after the last accepted token's.

    Layers `0..E-1` run only on the last candidate token; layers `E..L-1` run on the exit-query cache plus it.
    """
    model, state, exit_layer = generator.model, generator.state, generator.exit_layer
    hidden = model.model.embed_tokens(candidate_ids[:, -1:])  # (1, 1, hidden_size)
    hidden = state.run(hidden, 0, exit_layer)
    hidden = torch.cat([generator.exit_query_cache, hidden], dim=1)  # (1, num_drafted + 1, hidden_size)
    hidden = state.run(hidden, exit_layer, model.config.num_hidden_layers)
    generator.exit_query_cache = None
    return model.exit_logits(hidden).float()


def accept_greedy(draft_tokens: torch.LongTensor, target_scores: torch.Tensor) -> tuple[int, torch.LongTensor]:
    """Longest prefix of `draft_tokens` `(k,)` the full model's argmax agrees with, plus its next token.

    `target_scores` `(k + 1, vocab_size)`. Returns the number accepted and the new tokens `(accepted + 1,)`.
    """
    target_tokens = target_scores.argmax(dim=-1)  # (k + 1,)
    mismatches = (draft_tokens != target_tokens[:-1]).nonzero()
    num_accepted = int(mismatches[0]) if len(mismatches) else len(draft_tokens)
    return num_accepted, target_tokens[: num_accepted + 1]


def accept_speculative_sampling(
    draft_tokens: torch.LongTensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> tuple[int, torch.LongTensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the tokens follow `target_probs` exactly.

    Draft token i is kept with probability min(1, p_i / q_i) until the first rejection, which is replaced by a
    sample from norm(max(p − q, 0)); if all are kept, one more token is sampled from p.

    Args:
        draft_tokens: `(k,)`. draft_probs: `(k, vocab_size)`, q. target_probs: `(k + 1, vocab_size)`, p.
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
        residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp(min=0)
        next_probs = residual / residual.sum()
    else:
        next_probs = target_probs[num_drafted]
    next_token = torch.multinomial(next_probs, num_samples=1)  # (1,)
    return num_accepted, torch.cat([draft_tokens[:num_accepted], next_token])


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
        raise ValueError(f"Self-speculative decoding supports batch size 1, got {input_ids.shape[0]}.")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("Self-speculative decoding needs `input_ids`; `inputs_embeds` is not supported.")
    cache = model_kwargs.get("cache")
    if type(cache) is not DynamicCache or cache.get_seq_length() > 0:
        raise ValueError(
            f"Self-speculative decoding needs a fresh `DynamicCache` (the default cache), got {type(cache).__name__}."
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
    generator.state = DecodingState(model, cache, model_kwargs.get("attention_mask"))
    stats = SpeculationStats()
    num_layers = model.config.num_hidden_layers

    # Prefill: every layer processes the prompt but its last token, which the first draft step takes.
    if input_ids.shape[1] > 1:
        generator.state.run(model.model.embed_tokens(input_ids[:, :-1]), 0, num_layers)

    finished = False
    while not finished:
        cur_len = input_ids.shape[1]
        # Draft.
        candidate_ids, draft_scores = generator.get_candidates(input_ids)
        num_drafted = candidate_ids.shape[1] - cur_len
        # Verify: scores for the token after each of the last accepted and the drafted ones.
        raw = verify(generator, candidate_ids)[0]  # (num_drafted + 1, vocab_size)
        processed = torch.stack(
            [logits_processor(candidate_ids[:, : cur_len + i], raw[i : i + 1])[0] for i in range(num_drafted + 1)]
        )
        # Accept.
        draft_tokens = candidate_ids[0, cur_len:]
        if do_sample:
            draft_probs = draft_scores[0].softmax(dim=-1) if num_drafted else processed[:0]
            num_accepted, new_tokens = accept_speculative_sampling(draft_tokens, draft_probs, processed.softmax(dim=-1))
        else:
            num_accepted, new_tokens = accept_greedy(draft_tokens, processed)
        stats.rounds += 1
        stats.drafted_tokens += num_drafted
        stats.accepted_tokens += num_accepted

        # Stop exactly where plain decoding would: after the first token any stopping criterion fires on.
        for num_kept in range(1, len(new_tokens) + 1):
            sequence = torch.cat([input_ids, new_tokens[None, :num_kept]], dim=1)
            if stopping_criteria(sequence, None).any():
                finished = True
                break
        new_tokens = new_tokens[:num_kept]
        input_ids = sequence
        if streamer is not None:
            streamer.put(new_tokens[None].cpu())
        if scores is not None:
            scores.extend(processed[i : i + 1] for i in range(num_kept))
        if raw_logits is not None:
            raw_logits.extend(raw[i : i + 1] for i in range(num_kept))
        # Every layer keeps all tokens but the last, which the next round's first draft step processes.
        generator.state.crop(input_ids.shape[1] - 1)

    if streamer is not None:
        streamer.end()
    model.speculation_stats = stats
    if not generation_config.return_dict_in_generate:
        return input_ids
    return SelfSpeculativeOutput(
        sequences=input_ids,
        scores=tuple(scores) if scores is not None else None,
        logits=tuple(raw_logits) if raw_logits is not None else None,
        cache=cache,
        rounds=stats.rounds,
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        acceptance_rate=stats.acceptance_rate,
    )
