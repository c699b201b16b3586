"""Per-layer exit quality against the model's own early-exit forward and loss."""

import math

import pytest
import torch
from measure_helpers import tiny_tokenizer

from hf_layerskip.generation.layer_quality import layer_quality, tokenize_texts

SEQUENCES = [torch.tensor([[3, 9, 27, 81, 115, 40, 7, 66, 12]]), torch.tensor([[50, 51, 52, 4, 99, 17]])]


def test_every_layer_matches_the_early_exit_forward(model):
    rows = layer_quality(model, SEQUENCES, progress=False)
    num_layers = model.config.num_hidden_layers
    assert [r.layer for r in rows] == list(range(1, num_layers + 1))
    predicted = sum(s.shape[1] - 1 for s in SEQUENCES)
    with torch.no_grad():
        final = [model(input_ids=s).logits[0, :-1].argmax(-1) for s in SEQUENCES]
        for row in rows:
            nll, agree = 0.0, 0
            for ids, final_tokens in zip(SEQUENCES, final):
                out = model(input_ids=ids, labels=ids, exit_layer=row.layer)
                nll += out.loss.item() * (ids.shape[1] - 1)  # the loss is a mean over predicted tokens
                agree += int((out.logits[0, :-1].argmax(-1) == final_tokens).sum())
            assert row.tokens == predicted
            assert row.perplexity == pytest.approx(math.exp(nll / predicted), rel=1e-5)
            assert row.top1_agreement == pytest.approx(agree / predicted)
    assert rows[-1].top1_agreement == 1.0


def test_tokenize_texts_truncates_and_stops_at_the_token_budget():
    tokenizer = tiny_tokenizer()
    texts = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9 w10", "w11 w12 w13"]
    sequences = tokenize_texts(tokenizer, texts, max_length=3, max_tokens=5)
    # "w6" is a single token (no target) and is skipped; the budget leaves 2 tokens of the third text.
    assert [s.tolist() for s in sequences] == [[[3, 4, 5]], [[9, 10]]]
    with pytest.raises(ValueError, match="two tokens"):
        tokenize_texts(tokenizer, ["w1"], max_length=8)
