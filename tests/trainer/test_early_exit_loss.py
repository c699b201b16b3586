"""The vectorised, chunked early-exit loss against a per-layer loop over full logits."""

import pytest
import torch
from conftest import tiny_model
from trainer_helpers import per_layer_loop_distillation_loss, per_layer_loop_loss

from hf_layerskip.trainer import early_exit_loss, early_exit_loss_sums


def batch(seed=0, batch_size=3, seq_len=12, vocab_size=128):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[0, 3] = labels[1, 7] = -100  # ignored targets
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -4:] = 0  # right padding
    return input_ids, labels, attention_mask


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(model, loss, reference, reference_grads):
    """Back-propagates `loss` through `model` (gradients zeroed) and compares with the reference's."""
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    grads = gradients(model)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_vectorised_loss_and_gradients_equal_per_layer_loop(chunk_size):
    layers, weights = [1, 3, 5], torch.tensor([0.2, 0.3, 0.5])
    input_ids, labels, attention_mask = batch()

    model = tiny_model().train()
    reference = per_layer_loop_loss(model, input_ids, labels, attention_mask, layers, weights)
    reference.backward()
    reference_grads = gradients(model)

    model.zero_grad()
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
    )
    hidden = [outputs.layer_hidden_states[layer] for layer in layers]
    loss = early_exit_loss(model.exit_logits, hidden, labels, weights, attention_mask, chunk_size)
    assert_same_loss_and_gradients(model, loss, reference, reference_grads)


def test_per_exit_sums_match_each_layer_and_count_only_real_targets():
    model = tiny_model()
    input_ids, labels, attention_mask = batch(seed=1)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True)
    layers = [0, 2, 5]
    sums, count = early_exit_loss_sums(
        model.exit_logits, [outputs.layer_hidden_states[layer] for layer in layers], labels, attention_mask, 5
    )
    # 3 rows × 11 shifted positions, minus 2 ignored labels, minus 4 padded targets.
    assert count.item() == 3 * 11 - 2 - 4
    for layer, loss_sum in zip(layers, sums):
        expected = per_layer_loop_loss(model, input_ids, labels, attention_mask, [layer], [1.0]) * count
        torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)


def test_padding_and_ignored_labels_do_not_change_the_loss():
    model = tiny_model()
    input_ids, labels, attention_mask = batch(seed=2)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True)
    hidden = [outputs.layer_hidden_states[layer] for layer in (2, 5)]
    weights = torch.tensor([0.5, 0.5])
    loss = early_exit_loss(model.exit_logits, hidden, labels, weights, attention_mask)
    scrambled = labels.clone()
    scrambled[2, -4:] = 7  # labels under padding
    loss_scrambled = early_exit_loss(model.exit_logits, hidden, scrambled, weights, attention_mask)
    assert loss_scrambled.item() == loss.item()


def test_projects_only_target_rows_of_selected_exits_in_bounded_chunks():
    model = tiny_model()
    input_ids, labels, attention_mask = batch(seed=3)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True)
    projected_rows = []

    def recording_exit(hidden_rows):
        projected_rows.append(hidden_rows.shape[0])
        return model.exit_logits(hidden_rows)

    layers = [1, 4]
    _, count = early_exit_loss_sums(
        recording_exit, [outputs.layer_hidden_states[layer] for layer in layers], labels, attention_mask, chunk_size=8
    )
    assert sum(projected_rows) == len(layers) * count.item()
    assert max(projected_rows) <= 8


def test_no_full_logits_are_kept_for_backward():
    model = tiny_model().train()
    vocab_size = model.config.vocab_size
    input_ids, labels, attention_mask = batch(seed=4)
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
    )
    hidden = [outputs.layer_hidden_states[layer] for layer in (0, 3, 5)]
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = early_exit_loss(model.exit_logits, hidden, labels, torch.ones(3) / 3, attention_mask, chunk_size=16)
    assert saved_shapes, "the hook saw nothing: the test would pass vacuously"
    assert not [shape for shape in saved_shapes if shape and shape[-1] == vocab_size]
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_batch_without_targets_gives_zero_loss_that_backpropagates():
    model = tiny_model().train()
    input_ids = torch.randint(0, 128, (2, 6))
    labels = torch.full_like(input_ids, -100)
    outputs = model(input_ids=input_ids, output_layer_hidden_states=True, use_cache=False)
    loss = early_exit_loss(model.exit_logits, [outputs.layer_hidden_states[5]], labels, torch.ones(1))
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("alpha,chunk_size", [(1.0, 7), (0.3, 10_000), (0.3, 5)])
def test_distillation_loss_and_gradients_equal_per_layer_loop(alpha, chunk_size):
    layers, weights = [1, 5], torch.tensor([0.4, 0.6])
    input_ids, labels, attention_mask = batch(seed=2)
    teacher = tiny_model(seed=1).eval()

    model = tiny_model().train()
    reference = per_layer_loop_distillation_loss(
        model, teacher, input_ids, labels, attention_mask, layers, weights, alpha
    )
    reference.backward()
    reference_grads = gradients(model)

    model.zero_grad()
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
    )
    with torch.no_grad():
        teacher_hidden = teacher(
            input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
        ).layer_hidden_states[-1]
    hidden = [outputs.layer_hidden_states[layer] for layer in layers]
    loss = early_exit_loss(
        model.exit_logits,
        hidden,
        labels,
        weights,
        attention_mask,
        chunk_size,
        teacher_hidden_states=teacher_hidden,
        teacher_exit_logits=teacher.exit_logits,
        distillation_weight=alpha,
    )
    assert_same_loss_and_gradients(model, loss, reference, reference_grads)


def test_distillation_from_itself_leaves_only_the_cross_entropy_share():
    model = tiny_model()
    input_ids, labels, attention_mask = batch(seed=3)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True)
    last = [outputs.layer_hidden_states[-1]]
    cross_entropy, _ = early_exit_loss_sums(model.exit_logits, last, labels, attention_mask)
    mixed, _ = early_exit_loss_sums(
        model.exit_logits, last, labels, attention_mask, teacher_hidden_states=last[0], distillation_weight=0.25
    )
    torch.testing.assert_close(mixed, 0.75 * cross_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_distillation_weight_outside_unit_interval_is_refused(alpha):
    model = tiny_model()
    input_ids, labels, _ = batch()
    hidden = model(input_ids=input_ids, output_layer_hidden_states=True).layer_hidden_states[-1]
    with pytest.raises(ValueError, match="distillation_weight"):
        early_exit_loss_sums(
            model.exit_logits, [hidden], labels, teacher_hidden_states=hidden, distillation_weight=alpha
        )
