"""Draft heads trained on the frozen model: a draft vocabulary counted from the full model's own predictions, and
exit adapters distilled from its last layer.

The model's weights never change, so its output stays exactly the base model's. One forward pass over the training
text records each exit layer's output and the last layer's; the adapters then train on those states alone, which
costs a small fraction of a forward pass per step (the LM head's draft-vocabulary rows and the adapter).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..generation.layer_quality import DEFAULT_THRESHOLDS, ExitAgreement
from ..modeling.draft_head import DraftExit, ExitAdapter
from ..modeling.modeling_layerskip import softcap

EXIT_ADAPTER_LOSSES = ("cross_entropy", "kl", "cross_entropy+kl")


@dataclass
class ExitStates:
    """The frozen model's states at every position of a text set.

    `exit_hidden[E]` `(num_tokens, hidden_size)`: layer E's output, before the final norm. `final_hidden`
    `(num_tokens, hidden_size)`: the last layer's output after the final norm. `targets` `(num_tokens,)`: the full
    model's argmax, the token greedy verification accepts.
    """

    exit_hidden: dict[int, torch.Tensor]
    final_hidden: torch.Tensor
    targets: torch.LongTensor

    def __len__(self) -> int:
        return len(self.targets)

    def split(self, num_held_out: int) -> tuple["ExitStates", "ExitStates"]:
        """The first `len - num_held_out` positions and the last `num_held_out`."""
        cut = len(self) - num_held_out

        def part(rows: slice) -> ExitStates:
            exits = {layer: hidden[rows] for layer, hidden in self.exit_hidden.items()}
            return ExitStates(exits, self.final_hidden[rows], self.targets[rows])

        return part(slice(0, cut)), part(slice(cut, None))


@torch.inference_mode()
def collect_exit_states(
    model, sequences: list[torch.LongTensor], exit_layers: list[int], progress: bool = True
) -> ExitStates:
    """Runs the model once over each sequence `(1, length)` and keeps the states `ExitStates` describes."""
    exits = {layer: [] for layer in exit_layers}
    finals, targets = [], []
    for input_ids in tqdm(sequences, desc="exit states", disable=not progress):
        outputs = model(input_ids=input_ids.to(model.device), use_cache=False, output_layer_hidden_states=True)
        for layer in exit_layers:
            exits[layer].append(outputs.layer_hidden_states[layer - 1][0].float())
        finals.append(model.model.norm(outputs.layer_hidden_states[-1][0]).float())
        targets.append(outputs.logits[0].argmax(dim=-1))
    return ExitStates({layer: torch.cat(parts) for layer, parts in exits.items()}, torch.cat(finals), torch.cat(targets))


def build_draft_vocab(tokens: torch.LongTensor, vocab_size: int, size: int) -> torch.LongTensor:
    """The `size` most frequent ids of `tokens` (ties to the lower id), most frequent first, `(size,)`.

    Ids that never occur fill the tail in id order, so any `size` up to `vocab_size` is served.
    """
    if not 1 <= size <= vocab_size:
        raise ValueError(f"The draft vocabulary size must be in [1, {vocab_size}], got {size!r}.")
    counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab_size)
    # A stable sort on descending counts keeps equal counts in id order.
    return torch.sort(counts, descending=True, stable=True).indices[:size]


def draft_vocab_coverage(vocab_ids: torch.LongTensor, tokens: torch.LongTensor) -> float:
    """The share of `tokens` that fall inside the draft vocabulary `vocab_ids`."""
    inside = torch.isin(tokens.flatten(), vocab_ids.to(tokens.device))
    return inside.float().mean().item() if len(inside) else 0.0


@dataclass
class ExitAdapterTrainingArguments:
    """How `train_exit_adapter` trains one adapter with the model frozen."""

    exit_adapter_rank: int | None = field(
        default=None,
        metadata={"help": "rank of each adapter's residual map; default: a full hidden_size x hidden_size map"},
    )
    loss: str = field(
        default="cross_entropy",
        metadata={
            "help": "cross_entropy on the full model's argmax (what greedy verification accepts; calibrates the "
            "draft's confidence to its chance of being accepted), kl to the full model's distribution over the "
            "draft vocabulary, or cross_entropy+kl",
            "choices": list(EXIT_ADAPTER_LOSSES),
        },
    )
    epochs: int = field(default=3, metadata={"help": "passes over the training positions"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (one-cycle schedule)"})
    batch_size: int = field(default=512, metadata={"help": "positions per optimizer step"})
    seed: int = field(default=0, metadata={"help": "adapter initialisation and position order"})

    def __post_init__(self):
        if self.loss not in EXIT_ADAPTER_LOSSES:
            raise ValueError(f"`loss` must be one of {', '.join(map(repr, EXIT_ADAPTER_LOSSES))}, got {self.loss!r}.")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate!r}.")


def exit_adapter_loss(
    draft_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.LongTensor, loss: str
) -> torch.Tensor:
    """The adapter's loss on a batch of draft-vocabulary logits.

    Args:
        draft_logits: `(batch, K)`, the adapted exit's logits over the draft vocabulary.
        teacher_logits: `(batch, K)`, the last layer's logits over the same ids.
        targets: `(batch,)`, the full model's argmax as an index into the draft vocabulary, −1 where it lies
            outside (such positions add nothing to the cross-entropy: no draft can match them).
        loss: one of `EXIT_ADAPTER_LOSSES`.
    """
    total = draft_logits.new_zeros(())
    if "cross_entropy" in loss:
        total = total + F.cross_entropy(draft_logits, targets, ignore_index=-1)
    if "kl" in loss:
        log_teacher = teacher_logits.log_softmax(dim=-1)
        total = total + F.kl_div(draft_logits.log_softmax(dim=-1), log_teacher, log_target=True, reduction="batchmean")
    return total


def train_exit_adapter(
    model,
    states: ExitStates,
    exit_layer: int,
    args: ExitAdapterTrainingArguments,
    vocab_ids: torch.LongTensor | None = None,
    progress: bool = True,
) -> ExitAdapter:
    """An adapter for `exit_layer`, trained on `states` so that norm(adapter(h_E)) through the LM head's rows
    `vocab_ids` (all rows when `None`) predicts what the last layer predicts. The model is only read."""
    generator = torch.Generator().manual_seed(args.seed)
    hidden_size = model.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        adapter = ExitAdapter(hidden_size, args.exit_adapter_rank)
    weight = model.lm_head.weight.detach().float()
    if vocab_ids is not None:
        weight = weight.index_select(0, vocab_ids)  # (K, hidden_size)
        index_in_vocab = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        index_in_vocab[vocab_ids] = torch.arange(len(vocab_ids))
        targets = index_in_vocab[states.targets]
    else:
        targets = states.targets
    norm, cap = model.model.norm, model.final_logit_softcap  # the exit as the model's, soft-capping included
    hidden, final = states.exit_hidden[exit_layer], states.final_hidden
    steps_per_epoch = max(len(states) // args.batch_size, 1)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    bar = tqdm(total=args.epochs * steps_per_epoch, desc=f"exit adapter E={exit_layer}", disable=not progress)
    for _ in range(args.epochs):
        order = torch.randperm(len(states), generator=generator)
        for step in range(steps_per_epoch):
            rows = order[step * args.batch_size : (step + 1) * args.batch_size]
            draft_logits = softcap(F.linear(norm(adapter(hidden[rows])), weight), cap)
            with torch.no_grad():
                teacher_logits = softcap(F.linear(final[rows], weight), cap) if "kl" in args.loss else None
            loss = exit_adapter_loss(draft_logits, teacher_logits, targets[rows], args.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return adapter.eval()


@torch.no_grad()
def exit_agreement(
    model,
    states: ExitStates,
    exit_layer: int,
    adapter: ExitAdapter | None = None,
    vocab_ids: torch.LongTensor | None = None,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    batch_size: int = 4096,
) -> ExitAgreement:
    """How the draft exit at `exit_layer`, through `adapter` and over `vocab_ids`, agrees with the full model on
    `states`, and its calibration at `thresholds`."""
    draft = DraftExit(model.model.norm, model.lm_head.weight, adapter, vocab_ids, model.final_logit_softcap)
    counts = ExitAgreement(tuple(thresholds))
    hidden = states.exit_hidden[exit_layer]
    for start in range(0, len(states), batch_size):
        rows = slice(start, start + batch_size)
        counts.add(draft(hidden[rows]), states.targets[rows])
    return counts
