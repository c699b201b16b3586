"""Per-exit loss, agreement and accuracy against direct computations on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from hf_layerskip.trainer.evaluation import exit_report


def test_exit_report_matches_direct_computation():
    model = tiny_model()
    input_ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    report = exit_report(model, input_ids, batch_size=2)  # batches of 2, 2 and 1 sequences

    with torch.no_grad():
        outputs = model(input_ids=input_ids, output_layer_hidden_states=True)
        final_top1 = outputs.logits[:, :-1].argmax(-1)
        targets = input_ids[:, 1:]
        for layer, hidden in enumerate(outputs.layer_hidden_states):
            logits = model.exit_logits(hidden)[:, :-1]
            top1 = logits.argmax(-1)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            assert report.loss[layer] == pytest.approx(loss.item(), rel=1e-5)
            assert report.agreement[layer] == pytest.approx((top1 == final_top1).float().mean().item())
            assert report.accuracy[layer] == pytest.approx((top1 == targets).float().mean().item())
        assert report.loss[-1] == pytest.approx(model(input_ids=input_ids, labels=input_ids).loss.item(), rel=1e-5)
    assert report.agreement[-1] == 1.0
