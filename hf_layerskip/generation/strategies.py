"""The decoding strategies a benchmark compares, each run as one timed greedy `generate` call."""

import time
from dataclasses import dataclass

import torch

from .builtin import plain_llama_view

STRATEGY_KINDS = ("plain", "early_exit", "self_speculative", "builtin")
LOSSLESS_KINDS = ("plain", "self_speculative", "builtin")


@dataclass(frozen=True)
class Strategy:
    """One way to decode: `kind` plus its exit layer `E` and draft length `d` where they apply. Self-speculative
    decoding may also stop a draft below a `confidence_threshold`, draft over the first `draft_vocab_size` ids of
    the model's draft vocabulary (`None`: all of it), and draft up to `lookup_tokens` tokens by lookup (`None`: the
    model config's `num_lookup_speculations`)."""

    kind: str
    exit_layer: int | None = None
    num_speculations: int | None = None
    confidence_threshold: float = 0.0
    draft_vocab_size: int | None = None
    lookup_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in STRATEGY_KINDS:
            raise ValueError(f"Unknown strategy {self.kind!r}; choose from {STRATEGY_KINDS}.")
        if self.kind != "plain" and self.exit_layer is None:
            raise ValueError(f"Strategy {self.kind!r} needs an exit layer.")
        if self.kind in ("self_speculative", "builtin") and self.num_speculations is None:
            raise ValueError(f"Strategy {self.kind!r} needs a number of speculations.")
        tuned = self.confidence_threshold or self.draft_vocab_size is not None or self.lookup_tokens is not None
        if self.kind != "self_speculative" and tuned:
            raise ValueError(
                "Only self_speculative strategies take a confidence threshold, draft vocabulary size or lookup length, "
                f"got {self.kind!r}."
            )

    @property
    def lossless(self) -> bool:
        """Greedy output must equal plain greedy decoding token for token."""
        return self.kind in LOSSLESS_KINDS

    @property
    def speculative(self) -> bool:
        return self.kind in ("self_speculative", "builtin")

    @property
    def name(self) -> str:
        if self.kind == "plain":
            return "plain"
        if self.kind == "early_exit":
            return f"early_exit(E={self.exit_layer})"
        extras = f",t={self.confidence_threshold:g}" if self.confidence_threshold else ""
        extras += f",K={self.draft_vocab_size}" if self.draft_vocab_size is not None else ""
        extras += f",lookup={self.lookup_tokens}" if self.lookup_tokens else ""
        return f"{self.kind}(E={self.exit_layer},d={self.num_speculations}{extras})"


def standard_strategies(
    kinds, exit_layer: int, num_speculations: int, confidence_threshold: float = 0.0, lookup_tokens: int | None = None
) -> list[Strategy]:
    """The strategies named in `kinds`, all at the same `(E, d)`; self-speculative drafts stop below
    `confidence_threshold` and look up `lookup_tokens`."""
    return [
        Strategy(
            kind,
            None if kind == "plain" else exit_layer,
            num_speculations if kind in ("self_speculative", "builtin") else None,
            confidence_threshold if kind == "self_speculative" else 0.0,
            lookup_tokens=lookup_tokens if kind == "self_speculative" else None,
        )
        for kind in kinds
    ]


@dataclass
class GenerationRecord:
    """One timed call: the new tokens `(num_new,)` and, for speculative strategies, the round counts."""

    new_tokens: torch.LongTensor
    seconds: float
    rounds: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    # Self-speculative only: draft passes, withheld (unconfident) drafts included.
    draft_steps: int | None = None
    # Self-speculative only: `(num_new,)`, True where the token is an accepted draft.
    from_draft: torch.BoolTensor | None = None


class _CountingCandidates:
    """Wraps a transformers candidate generator to count rounds, drafted and accepted tokens.

    Transformers' assisted decoding reports each round through `update_candidate_strategy(ids, scores, n_matches)`,
    where `scores` `(1, num_drafted + 1, vocab_size)`.
    """

    def __init__(self, inner):
        self.inner = inner
        self.rounds = self.drafted_tokens = self.accepted_tokens = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.rounds += 1
        self.drafted_tokens += scores.shape[1] - 1
        self.accepted_tokens += int(num_matches)
        return self.inner.update_candidate_strategy(input_ids, scores, num_matches)


class StrategyRunner:
    """Runs any strategy on one model; transformers' built-in path runs on a plain-Llama view of the same weights."""

    def __init__(self, model):
        self.model = model
        self._builtin_model = None
        self._builtin_counter: _CountingCandidates | None = None

    @property
    def builtin_model(self):
        if self._builtin_model is None:
            view = plain_llama_view(self.model)
            make_candidates = view._get_candidate_generator

            def counted(*args, **kwargs):
                self._builtin_counter = _CountingCandidates(make_candidates(*args, **kwargs))
                return self._builtin_counter

            view._get_candidate_generator = counted  # instance attribute: counts this view's rounds only
            self._builtin_model = view
        return self._builtin_model

    def _synchronize(self):
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.inference_mode()
    def run(
        self, strategy: Strategy, input_ids: torch.LongTensor, max_new_tokens: int, **generate_kwargs
    ) -> GenerationRecord:
        """Greedy-decodes `max_new_tokens` after `input_ids` `(1, prompt_length)` with `strategy`, timing the call."""
        kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, **generate_kwargs)
        model = self.model
        if strategy.kind == "early_exit":
            kwargs["early_exit"] = strategy.exit_layer
        elif strategy.kind == "self_speculative":
            kwargs.update(
                assistant_early_exit=strategy.exit_layer,
                num_assistant_tokens=strategy.num_speculations,
                assistant_confidence_threshold=strategy.confidence_threshold,
                prompt_lookup_num_tokens=strategy.lookup_tokens,
                return_dict_in_generate=True,
            )
        elif strategy.kind == "builtin":
            model = self.builtin_model
            # The built-in path reads the draft length from the view's own generation config only.
            model.generation_config.num_assistant_tokens = strategy.num_speculations
            kwargs["assistant_early_exit"] = strategy.exit_layer
        with self.model.draft_head.vocab_prefix(strategy.draft_vocab_size):
            self._synchronize()
            start = time.perf_counter()
            output = model.generate(input_ids, **kwargs)
            self._synchronize()
            seconds = time.perf_counter() - start

        sequences = output.sequences if strategy.kind == "self_speculative" else output
        record = GenerationRecord(sequences[0, input_ids.shape[1] :].cpu(), seconds)
        if strategy.kind == "self_speculative":  # the counts of the one row
            record.rounds, record.drafted_tokens = int(output.rounds[0]), int(output.drafted_tokens[0])
            record.accepted_tokens, record.from_draft = int(output.accepted_tokens[0]), output.from_draft[0].cpu()
            record.draft_steps = int(output.draft_steps[0])
        elif strategy.kind == "builtin":
            counter = self._builtin_counter
            record.rounds, record.drafted_tokens = counter.rounds, counter.drafted_tokens
            record.accepted_tokens = counter.accepted_tokens
        return record
