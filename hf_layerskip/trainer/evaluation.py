"""How usable each exit is: per-exit next-token loss and top-1 agreement with the last layer."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExitReport:
    """Per-exit figures over a set of sequences; index l is the exit after layer l (the last is the model's output).

    loss: mean next-token cross-entropy. agreement: fraction of positions whose top-1 token equals the last
    layer's. accuracy: fraction of positions whose top-1 token is the next token.
    """

    loss: list[float]
    agreement: list[float]
    accuracy: list[float]


@torch.no_grad()
def exit_report(model, input_ids: torch.LongTensor, batch_size: int = 8) -> ExitReport:
    """`ExitReport` of `model` (a LayerSkip causal LM, in eval mode) on `input_ids` `(num_seqs, seq_len)`."""
    num_layers = model.config.num_hidden_layers
    loss_sums, agree_counts, correct_counts = torch.zeros(num_layers), torch.zeros(num_layers), torch.zeros(num_layers)
    num_positions = 0
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(model.device)  # (b, seq_len)
        outputs = model(input_ids=batch, output_layer_hidden_states=True, use_cache=False, logits_to_keep=1)
        targets = batch[:, 1:].flatten()  # (b·(seq_len − 1),)
        final_top1 = None
        for layer in reversed(range(num_layers)):
            logits = model.exit_logits(outputs.layer_hidden_states[layer][:, :-1]).flatten(0, 1).float()
            top1 = logits.argmax(-1)
            final_top1 = top1 if final_top1 is None else final_top1
            loss_sums[layer] += F.cross_entropy(logits, targets, reduction="sum").item()
            agree_counts[layer] += (top1 == final_top1).sum().item()
            correct_counts[layer] += (top1 == targets).sum().item()
        num_positions += targets.numel()
    return ExitReport(
        loss=(loss_sums / num_positions).tolist(),
        agreement=(agree_counts / num_positions).tolist(),
        accuracy=(correct_counts / num_positions).tolist(),
    )
