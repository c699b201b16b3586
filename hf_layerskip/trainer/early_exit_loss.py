"""The early-exit loss: next-token cross-entropy at several exits through the model's own norm and LM head.

Optionally each exit also distils from a teacher's next-token distribution (the model with its adapters disabled):
row loss (1 − α)·CE(target) + α·KL(teacher ‖ exit), which trains an exit towards exactly what verification accepts
and holds the last layer to the model it started from.

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


def _row_distillation_loss(exit_logits, hidden_rows, target_rows, teacher_log_probs, distillation_weight):
    log_probs = exit_logits(hidden_rows).float().log_softmax(dim=-1)  # (chunk, vocab_size)
    divergence = F.kl_div(log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=-1)  # (chunk,)
    if distillation_weight == 1.0:
        return divergence
    cross_entropy = F.nll_loss(log_probs, target_rows, reduction="none")  # (chunk,)
    return (1.0 - distillation_weight) * cross_entropy + distillation_weight * divergence


def early_exit_loss_sums(
    exit_logits: Callable[[torch.Tensor], torch.Tensor],
    layer_hidden_states: Sequence[torch.Tensor],
    labels: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 2048,
    teacher_hidden_states: torch.Tensor | None = None,
    teacher_exit_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distillation_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss at each exit: cross-entropy, or with a teacher (1 − α)·CE + α·KL(teacher ‖ exit).

    Args:
        exit_logits: maps hidden states `(rows, hidden_size)` to logits `(rows, vocab_size)`: the model's final
            norm and LM head (`LayerSkipForCausalLMMixin.exit_logits`).
        layer_hidden_states: K tensors `(batch_size, seq_len, hidden_size)`, one per exit, before the final norm.
        labels: `(batch_size, seq_len)`, unshifted; -100 marks positions without a target.
        attention_mask: `(batch_size, seq_len)`, optional; padded positions are never targets.
        chunk_size: the most positions projected through the head at once, per exit.
        teacher_hidden_states: `(batch_size, seq_len, hidden_size)`, optional: the teacher's last-layer outputs
            before its final norm; required when `distillation_weight` > 0.
        teacher_exit_logits: maps the teacher's hidden states to its logits, called without gradients. Default:
            `exit_logits`.
        distillation_weight: α in [0, 1], the weight of KL(teacher ‖ exit) against the cross-entropy.

    Returns:
        `(loss_sums (K,), num_targets ())`: each exit's summed loss and the number of targets it was summed over.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}.")
    if not 0.0 <= distillation_weight <= 1.0:
        raise ValueError(f"`distillation_weight` must be in [0, 1], got {distillation_weight!r}.")
    if distillation_weight > 0 and teacher_hidden_states is None:
        raise ValueError("`distillation_weight` > 0 needs `teacher_hidden_states`.")
    has_target, targets = next_token_targets(labels, attention_mask)  # (batch, seq_len - 1), (num_targets,)
    num_exits, num_targets = len(layer_hidden_states), targets.numel()
    exit_rows = [hidden[:, :-1][has_target] for hidden in layer_hidden_states]  # K × (N, hidden_size)
    if distillation_weight > 0:
        teacher_rows = teacher_hidden_states[:, :-1][has_target]  # (N, hidden_size)
        teacher_exit_logits = teacher_exit_logits or exit_logits

    remember = torch.is_grad_enabled() and any(rows.requires_grad for rows in exit_rows)
    row_losses = [[] for _ in range(num_exits)]
    for start in range(0, num_targets, chunk_size):
        positions = slice(start, start + chunk_size)
        row_loss, extra = _row_cross_entropy, ()
        if distillation_weight > 0:  # the teacher's distribution, once for every exit
            with torch.no_grad():
                teacher_log_probs = teacher_exit_logits(teacher_rows[positions]).float().log_softmax(dim=-1)
            row_loss, extra = _row_distillation_loss, (teacher_log_probs, distillation_weight)
        for rows, losses in zip(exit_rows, row_losses):
            if remember:
                chunk = checkpoint(
                    row_loss, exit_logits, rows[positions], targets[positions], *extra, use_reentrant=False
                )
            else:
                chunk = row_loss(exit_logits, rows[positions], targets[positions], *extra)
            losses.append(chunk)
    if num_targets == 0:  # zero losses that still reach the graph, so backward() works
        zero = sum(rows.float().sum() for rows in exit_rows)
        return zero + torch.zeros(num_exits, device=labels.device), torch.tensor(0, device=labels.device)
    loss_sums = torch.stack([torch.cat(losses).sum() for losses in row_losses])  # (K,)
    return loss_sums, torch.tensor(num_targets, device=labels.device)


def early_exit_loss(
    exit_logits: Callable[[torch.Tensor], torch.Tensor],
    layer_hidden_states: Sequence[torch.Tensor],
    labels: torch.LongTensor,
    weights: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 2048,
    teacher_hidden_states: torch.Tensor | None = None,
    teacher_exit_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    distillation_weight: float = 0.0,
) -> torch.Tensor:
    """Σ_k weights[k]·(mean next-token loss at exit k): a scalar.

    `weights` is `(K,)`, one per tensor of `layer_hidden_states`; other arguments as in `early_exit_loss_sums`.
    """
    loss_sums, num_targets = early_exit_loss_sums(
        exit_logits,
        layer_hidden_states,
        labels,
        attention_mask,
        chunk_size,
        teacher_hidden_states,
        teacher_exit_logits,
        distillation_weight,
    )
    return (weights.to(loss_sums) * loss_sums).sum() / num_targets.clamp(min=1)
