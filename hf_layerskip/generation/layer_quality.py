"""How good each layer's early exit is: next-token perplexity, and top-1 agreement with the last layer."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class ExitAgreement:
    """Running counts of how often an exit's argmax equals the full model's, overall and where the exit is
    confident (its top probability ≥ a threshold): the calibration that chooses `assistant_confidence_threshold`."""

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    positions: int = 0
    agreeing: int = 0
    confident: dict[float, int] = field(default_factory=dict)
    confident_and_right: dict[float, int] = field(default_factory=dict)

    def add(self, scores: torch.Tensor, final_tokens: torch.LongTensor) -> None:
        """Counts positions of the exit's `scores` `(n, vocab_size)` against the full model's tokens `(n,)`."""
        top_probability, predicted = scores.float().softmax(dim=-1).max(dim=-1)
        right = predicted == final_tokens
        self.positions += len(final_tokens)
        self.agreeing += int(right.sum())
        for threshold in self.thresholds:
            sure = top_probability >= threshold
            self.confident[threshold] = self.confident.get(threshold, 0) + int(sure.sum())
            self.confident_and_right[threshold] = self.confident_and_right.get(threshold, 0) + int((sure & right).sum())

    @property
    def top1_agreement(self) -> float:
        return self.agreeing / self.positions if self.positions else 0.0

    def confident_share(self, threshold: float) -> float:
        """The share of positions where the exit is confident at `threshold`."""
        return self.confident.get(threshold, 0) / self.positions if self.positions else 0.0

    def right_when_confident(self, threshold: float) -> float:
        """How often the exit agrees where it is confident at `threshold`; NaN where it never is."""
        confident = self.confident.get(threshold, 0)
        return self.confident_and_right[threshold] / confident if confident else math.nan

    def to_dict(self) -> dict:
        calibration = {}
        for t in self.thresholds:
            calibration[f"confident@{t:g}"] = self.confident_share(t)
            calibration[f"right_when_confident@{t:g}"] = self.right_when_confident(t)
        return {"top1_agreement": self.top1_agreement, **calibration}


@dataclass
class LayerQuality:
    """Exit after `layer` layers (1-based): perplexity of the text, and how often its argmax equals the last layer's.

    `draft` is the same exit as a self-speculative draft sees it (through its exit adapter and over the draft
    vocabulary where the model has them), with its calibration; `None` for the last layer, which never drafts.
    """

    layer: int
    perplexity: float
    top1_agreement: float
    tokens: int
    draft: ExitAgreement | None = None

    def to_dict(self) -> dict:
        row = {"layer": self.layer, "perplexity": self.perplexity, "top1_agreement": self.top1_agreement}
        row["tokens"] = self.tokens
        if self.draft is not None:
            row.update({f"draft_{name}": value for name, value in self.draft.to_dict().items()})
        return row


def tokenize_texts(
    tokenizer, texts: list[str], max_length: int, max_tokens: int | None = None
) -> list[torch.LongTensor]:
    """Each text as ids `(1, length ≤ max_length)`, skipping texts under 2 tokens, until `max_tokens` are gathered."""
    sequences, total = [], 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] < 2:
            continue
        if max_tokens is not None:
            ids = ids[:, : max(max_tokens - total, 0)]
            if ids.shape[1] < 2:
                break
        sequences.append(ids)
        total += ids.shape[1]
    if not sequences:
        raise ValueError("No text gave at least two tokens; layer quality needs next-token targets.")
    return sequences


@torch.inference_mode()
def layer_quality(
    model, sequences: list[torch.LongTensor], progress: bool = True, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
) -> list[LayerQuality]:
    """Scores every layer's exit (the model's own final norm and LM head) on `sequences`, each `(1, length)`, and
    every draft exit E < L as `model.draft_exit(E)` scores it, with its calibration at `thresholds`.

    One forward pass per sequence returns every layer's output; each is scored on predicting the next token.
    Perplexity is exp of the mean negative log-likelihood over all predicted tokens.
    """
    num_layers = model.config.num_hidden_layers
    nll_sums = [0.0] * num_layers
    agreements = [0] * num_layers
    draft_exits = [model.draft_exit(layer) for layer in range(1, num_layers)]
    drafts = [ExitAgreement(tuple(thresholds)) for _ in draft_exits]
    predicted = 0
    for input_ids in tqdm(sequences, desc="layer quality", disable=not progress):
        input_ids = input_ids.to(model.device)
        outputs = model(input_ids=input_ids, use_cache=False, output_layer_hidden_states=True)
        targets = input_ids[0, 1:]  # (length - 1,)
        final_tokens = outputs.logits[0, :-1].argmax(dim=-1)  # (length - 1,)
        for index, hidden in enumerate(outputs.layer_hidden_states):
            logits = model.exit_logits(hidden[0, :-1]).float()  # (length - 1, vocab_size)
            nll_sums[index] += F.cross_entropy(logits, targets, reduction="sum").item()
            agreements[index] += int((logits.argmax(dim=-1) == final_tokens).sum())
            if index < len(drafts):
                drafts[index].add(draft_exits[index](hidden[0, :-1]), final_tokens)
        predicted += len(targets)
    return [
        LayerQuality(
            layer + 1,
            math.exp(nll_sums[layer] / predicted),
            agreements[layer] / predicted,
            predicted,
            drafts[layer] if layer < len(drafts) else None,
        )
        for layer in range(num_layers)
    ]
