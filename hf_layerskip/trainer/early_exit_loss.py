"""The early-exit loss: next-token cross-entropy at several exits through the model's own norm and LM head.

Projecting a hidden state through a large-vocabulary head costs more than a decoder layer, so only the exits
asked for are projected, only at the positions that have a target, and never more than `chunk_size` rows of
logits at once: with gradients on, each chunk's logits are recomputed in the backward pass instead of being kept.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def next_token_targets(
    labels: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.BoolTensor, torch.LongTensor]:
    """Shifted targets: `(has_target (batch_size, seq_len − 1), targets (num_targets,))`.

    Position i predicts `labels[:, i + 1]`; targets equal to -100 or at padded positions (`attention_mask` 0)
    are dropped.
    """
    shifted = labels[:, 1:]  # (batch_size, seq_len - 1)
    has_target = shifted != IGNORE_INDEX
    if attention_mask is not None:
        has_target &= attention_mask[:, 1:].bool()
    return has_target, shifted[has_target]


def _row_cross_entropy(exit_logits, hidden_rows, target_rows):
    logits = exit_logits(hidden_rows).float()  # (chunk, vocab_size)
    return F.cross_entropy(logits, target_rows, reduction="none")  # (chunk,)


def early_exit_loss_sums(
    exit_logits: Callable[[torch.Tensor], torch.Tensor],
    layer_hidden_states: Sequence[torch.Tensor],
    labels: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy at each exit.

    Args:
        exit_logits: maps hidden states `(rows, hidden_size)` to logits `(rows, vocab_size)`: the model's final
            norm and LM head (`LayerSkipLlamaForCausalLM.exit_logits`).
        layer_hidden_states: K tensors `(batch_size, seq_len, hidden_size)`, one per exit, before the final norm.
        labels: `(batch_size, seq_len)`, unshifted; -100 marks positions without a target.
        attention_mask: `(batch_size, seq_len)`, optional; padded positions are never targets.
        chunk_size: the most rows (exit × position pairs) projected through the head at once.

    Returns:
        `(loss_sums (K,), num_targets ())`: each exit's summed loss and the number of targets it was summed over.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    has_target, targets = next_token_targets(labels, attention_mask)  # (batch, seq_len - 1), (num_targets,)
    num_exits, num_targets = len(layer_hidden_states), targets.numel()
    hidden_rows = torch.cat([hidden[:, :-1][has_target] for hidden in layer_hidden_states])  # (K·N, hidden_size)
    target_rows = targets.repeat(num_exits)  # (K·N,)

    remember = torch.is_grad_enabled() and hidden_rows.requires_grad
    row_losses = []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        if remember:
            chunk = checkpoint(
                _row_cross_entropy, exit_logits, hidden_rows[rows], target_rows[rows], use_reentrant=False
            )
        else:
            chunk = _row_cross_entropy(exit_logits, hidden_rows[rows], target_rows[rows])
        row_losses.append(chunk)
    if not row_losses:  # no targets: zero losses that still reach the graph, so backward() works
        return hidden_rows.float().sum() + torch.zeros(num_exits, device=labels.device), torch.tensor(
            0, device=labels.device
        )
    loss_sums = torch.cat(row_losses).view(num_exits, num_targets).sum(dim=1)  # (K,)
    return loss_sums, torch.tensor(num_targets, device=labels.device)


def early_exit_loss(
    exit_logits: Callable[[torch.Tensor], torch.Tensor],
    layer_hidden_states: Sequence[torch.Tensor],
    labels: torch.LongTensor,
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """Σ_k weights[k]·(mean next-token cross-entropy at exit k): a scalar.

    `weights` is `(K,)`, one per tensor of `layer_hidden_states`; other arguments as in `early_exit_loss_sums`.
    """
    loss_sums, num_targets = early_exit_loss_sums(exit_logits, layer_hidden_states, labels, attention_mask, chunk_size)
    return (weights.to(loss_sums) * loss_sums).sum() / num_targets.clamp(min=1)
