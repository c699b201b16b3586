"""How good each layer's early exit is: next-token perplexity, and top-1 agreement with the last layer."""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class LayerQuality:
    """Exit after `layer` layers (1-based): perplexity of the text, and how often its argmax equals the last layer's."""

    layer: int
    perplexity: float
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


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
def layer_quality(model, sequences: list[torch.LongTensor], progress: bool = True) -> list[LayerQuality]:
    """Scores every layer's exit (the model's own final norm and LM head) on `sequences`, each `(1, length)`.

    One forward pass per sequence returns every layer's output; each is scored on predicting the next token.
    Perplexity is exp of the mean negative log-likelihood over all predicted tokens.
    """
    num_layers = model.config.num_hidden_layers
    nll_sums = [0.0] * num_layers
    agreements = [0] * num_layers
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
        predicted += len(targets)
    return [
        LayerQuality(layer + 1, math.exp(nll_sums[layer] / predicted), agreements[layer] / predicted, predicted)
        for layer in range(num_layers)
    ]
