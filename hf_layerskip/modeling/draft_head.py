"""The draft head: what a self-speculative draft projects an exit layer's output through.

Two optional, independent parts make drafts cheaper and better without touching the model's weights:

- an **exit adapter** per draft exit E: a small residual map applied to layer E's output before the model's own
  final norm and LM head (in the spirit of Kangaroo, arXiv 2404.18911). It is zero-initialised, so a fresh adapter
  leaves the exit as it is, and it is trained with the model frozen. The KV cache and the exit-query cache keep the
  layers' own states: the adapter changes what the draft proposes, never what verification computes;
- a **draft vocabulary** (FR-Spec, arXiv 2502.14856): the draft scores only the K most frequent token ids, reading
  K rows of the LM head instead of all of them. Verification always scores the full vocabulary.

This file travels with saved checkpoints as remote code: it may import only torch, transformers and same-folder
modules.
"""

import copy
from contextlib import contextmanager

import torch
from torch import nn


class ExitAdapter(nn.Module):
    """`h + up · down · h` on an exit layer's output `h` `(..., hidden_size)`; `h + up · h`, a full square map, when
    `rank` is `None`. `up` starts at zero, so a fresh adapter is the identity.

    The weights are this module's own parameters (not `nn.Linear` children), so that transformers' weight
    initialisation reaches this module and keeps `up` at zero.
    """

    def __init__(self, hidden_size: int, rank: int | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, hidden_size)) if rank is not None else None
        self.up = nn.Parameter(torch.empty(hidden_size, rank if rank is not None else hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.down is not None:
            nn.init.normal_(self.down, std=self.down.shape[1] ** -0.5)
        nn.init.zeros_(self.up)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        update = hidden_states if self.down is None else nn.functional.linear(hidden_states, self.down)
        return hidden_states + nn.functional.linear(update, self.up)


class DraftHead(nn.Module):
    """The config's exit adapters (`exit_adapter_layers`, keyed by exit layer E) and draft vocabulary
    (`draft_vocab_size` token ids in `vocab_ids`, most frequent first)."""

    def __init__(self, config):
        super().__init__()
        rank = config.exit_adapter_rank
        self.adapters = nn.ModuleDict(
            {str(layer): ExitAdapter(config.hidden_size, rank) for layer in config.exit_adapter_layers or ()}
        )
        vocab_ids = torch.arange(config.draft_vocab_size) if config.draft_vocab_size else None
        self.register_buffer("vocab_ids", vocab_ids)

    @contextmanager
    def vocab_prefix(self, size: int | None):
        """While inside, drafts score only the first `size` ids of the draft vocabulary (the most frequent ones);
        `None` changes nothing. For measuring how the draft vocabulary's size trades speed for acceptance."""
        if size is None:
            yield
            return
        available = len(self.vocab_ids) if self.vocab_ids is not None else 0
        if not 1 <= size <= available:
            raise ValueError(
                f"The draft vocabulary prefix must be in [1, {available}] (the model's draft vocabulary), got {size!r}."
            )
        full = self.vocab_ids
        self.vocab_ids = full[:size]
        try:
            yield
        finally:
            self.vocab_ids = full

    def adapter(self, exit_layer: int) -> ExitAdapter | None:
        """Exit layer `exit_layer`'s adapter, or `None`."""
        return self.adapters[str(exit_layer)] if str(exit_layer) in self.adapters else None


class DraftExit:
    """One draft exit, bound for one decoding call: `norm(adapter(h))` through the LM head's draft-vocabulary rows,
    gathered once so that each draft step reads only those.

    Args:
        norm: the model's final norm. lm_head_weight: `(vocab_size, hidden_size)`.
        adapter: the exit's adapter, or `None`. vocab_ids: the draft vocabulary `(K,)`, or `None` for all ids.
        softcap: the model's final-logit soft-capping `cap` (`cap · tanh(scores / cap)`), or `None`.
    """

    def __init__(
        self, norm, lm_head_weight: torch.Tensor, adapter: ExitAdapter | None, vocab_ids=None, softcap=None
    ):
        self.norm = norm
        self.softcap = softcap
        self.adapter = adapter
        self.vocab_size = lm_head_weight.shape[0]
        self.vocab_ids = vocab_ids
        self.weight = lm_head_weight if vocab_ids is None else lm_head_weight.index_select(0, vocab_ids)  # (K, hidden)

    def at(self, model, exit_layer: int) -> "DraftExit":
        """The same draft exit at `exit_layer`: that exit's adapter, sharing these gathered head rows."""
        other = copy.copy(self)
        other.adapter = model.draft_head.adapter(exit_layer)
        return other

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Float scores `(..., vocab_size)` of the exit layer's output `(..., hidden_size)`; `-inf` outside the
        draft vocabulary, so the draft's distribution is supported on it (speculative sampling stays exact)."""
        hidden = self.adapter(hidden_states) if self.adapter is not None else hidden_states
        scores = nn.functional.linear(self.norm(hidden), self.weight)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.float()
        if self.vocab_ids is None:
            return scores
        full = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, scores)


__all__ = ["ExitAdapter", "DraftHead", "DraftExit"]
