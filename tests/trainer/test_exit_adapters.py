"""Draft heads trained on the frozen model: states, draft vocabulary, losses and agreement against direct
computations with the model, and an adapter that learns what the plain exit cannot."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from hf_layerskip.modeling.draft_head import ExitAdapter
from hf_layerskip.trainer.exit_adapters import (
    ExitAdapterTrainingArguments,
    build_draft_vocab,
    collect_exit_states,
    draft_vocab_coverage,
    exit_adapter_loss,
    exit_agreement,
    train_exit_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sequences(count: int, length: int = 24, seed: int = 0) -> list[torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, length), generator=generator) for _ in range(count)]


def test_states_are_the_early_exit_forward_and_the_full_models_argmax(model):
    texts = sequences(3)
    states = collect_exit_states(model, texts, [2, 4], progress=False)
    assert len(states) == 3 * 24
    with torch.no_grad():
        for layer in (2, 4):
            exit_logits = torch.cat([model(input_ids=ids, exit_layer=layer).logits[0] for ids in texts])
            torch.testing.assert_close(model.exit_logits(states.exit_hidden[layer]), exit_logits)
        full = torch.cat([model(input_ids=ids).logits[0] for ids in texts])
        torch.testing.assert_close(model.lm_head(states.final_hidden), full)
        assert torch.equal(states.targets, full.argmax(dim=-1))
    train, held_out = states.split(10)
    assert len(train) == 62 and len(held_out) == 10
    assert torch.equal(held_out.exit_hidden[2], states.exit_hidden[2][62:])


def test_draft_vocab_is_the_most_frequent_ids_ties_by_id():
    tokens = torch.tensor([5, 3, 5, 9, 3, 5, 1, 9, 7])
    counts = Counter(tokens.tolist())
    reference = sorted(range(12), key=lambda token: (-counts[token], token))
    assert build_draft_vocab(tokens, 12, 12).tolist() == reference
    assert build_draft_vocab(tokens, 12, 3).tolist() == [5, 3, 9]
    assert draft_vocab_coverage(torch.tensor([5, 3]), tokens) == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match=r"\[1, 12\], got 13"):
        build_draft_vocab(tokens, 12, 13)


def test_losses_against_their_definitions():
    torch.manual_seed(0)
    draft, teacher = torch.randn(6, 10), torch.randn(6, 10)
    targets = torch.tensor([1, -1, 4, 9, -1, 0])
    kept = targets >= 0
    cross_entropy = -draft.log_softmax(-1)[kept.nonzero()[:, 0], targets[kept]].mean()
    teacher_probs = teacher.softmax(-1)
    kl = (teacher_probs * (teacher_probs.log() - draft.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(exit_adapter_loss(draft, teacher, targets, "cross_entropy"), cross_entropy)
    torch.testing.assert_close(exit_adapter_loss(draft, teacher, targets, "kl"), kl)
    torch.testing.assert_close(exit_adapter_loss(draft, teacher, targets, "cross_entropy+kl"), cross_entropy + kl)


def test_agreement_and_calibration_count_what_they_say(model):
    states = collect_exit_states(model, sequences(2), [3], progress=False)
    vocab = torch.arange(0, 128, 2)
    adapter = ExitAdapter(model.config.hidden_size)
    with torch.no_grad():
        adapter.up.normal_(std=0.2)
        scores = model.exit_logits(adapter(states.exit_hidden[3]))
    masked = torch.full_like(scores, float("-inf"))
    masked[:, vocab] = scores[:, vocab]
    probs = masked.softmax(-1)
    right = probs.argmax(-1) == states.targets
    report = exit_agreement(model, states, 3, adapter, vocab, thresholds=(0.05, 0.2))
    assert report.top1_agreement == pytest.approx(right.float().mean().item())
    for threshold in (0.05, 0.2):
        sure = probs.max(-1).values >= threshold
        assert report.confident_share(threshold) == pytest.approx(sure.float().mean().item())
        if sure.any():
            assert report.right_when_confident(threshold) == pytest.approx(right[sure].float().mean().item())


def test_a_trained_adapter_agrees_more_and_leaves_the_model_alone():
    model = tiny_model(seed=4)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    states = collect_exit_states(model, sequences(12, length=32), [2], progress=False)
    train = states.split(64)[0]
    args = ExitAdapterTrainingArguments(epochs=30, batch_size=64, learning_rate=3e-3)
    vocab = build_draft_vocab(train.targets, 128, 96)
    adapter = train_exit_adapter(model, train, 2, args, vocab, progress=False)
    plain = exit_agreement(model, train, 2, None, vocab).top1_agreement
    adapted = exit_agreement(model, train, 2, adapter, vocab).top1_agreement
    assert adapted > plain + 0.2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss="mse"), "`loss` must be one of"),
        (dict(epochs=0), "`epochs` must be at least 1, got 0"),
        (dict(learning_rate=0.0), "`learning_rate` must be positive"),
    ],
)
def test_bad_training_arguments_name_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        ExitAdapterTrainingArguments(**settings)


def test_cross_entropy_skips_targets_outside_the_draft_vocabulary():
    draft = torch.randn(3, 4)
    loss = exit_adapter_loss(draft, None, torch.tensor([-1, 2, -1]), "cross_entropy")
    torch.testing.assert_close(loss, F.cross_entropy(draft[1:2], torch.tensor([2])))
