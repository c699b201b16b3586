"""Layer dropout: the rate schedule, the per-sample masks, and what the model computes with them.

References are independent of the LayerSkip code path: a plain `LlamaForCausalLM` holding only the kept layers,
run on one row at a time.
"""

import pytest
import torch
from conftest import tiny_model
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from hf_layerskip import LayerSkipLlamaForCausalLM, layer_dropout_rates, sample_keep_masks

NUM_LAYERS = 6


def llama_without_layers(model: LayerSkipLlamaForCausalLM, dropped: set[int]) -> LlamaForCausalLM:
    """A plain Llama with `model`'s weights but without the decoder layers in `dropped`."""
    kept = [layer for layer in range(model.config.num_hidden_layers) if layer not in dropped]
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    llama = LlamaForCausalLM(LlamaConfig(**{**settings, "num_hidden_layers": len(kept)})).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            layer, rest = key.removeprefix("model.layers.").split(".", 1)
            if int(layer) not in kept:
                continue
            key = f"model.layers.{kept.index(int(layer))}.{rest}"
        state[key] = value
    llama.load_state_dict(state)
    return llama


def per_row_reference(model, input_ids, attention_mask, keep_masks) -> torch.Tensor:
    """Logits `(batch, seq, vocab)`, each row computed alone by a Llama without the layers its mask drops."""
    rows = []
    for row in range(input_ids.shape[0]):
        dropped = {layer for layer in range(NUM_LAYERS) if not keep_masks[layer, row]}
        if len(dropped) == NUM_LAYERS:  # nothing runs: the embedding goes straight to the norm and head
            rows.append(model.exit_logits(model.model.embed_tokens(input_ids[row : row + 1])))
            continue
        reference = llama_without_layers(model, dropped)
        rows.append(reference(input_ids[row : row + 1], attention_mask=attention_mask[row : row + 1]).logits)
    return torch.cat(rows)


@pytest.fixture
def batch():
    """Four rows, the last two left-padded, so that the padding mask has to be split per row."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128, (4, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0
    attention_mask[3, :5] = 0
    return input_ids, attention_mask


def assert_close_where_attended(actual, expected, attention_mask):
    """Padded positions attend to nothing; their outputs are not meaningful."""
    attended = attention_mask.bool()
    assert_close(actual[attended], expected[attended])


# Schedule.


@pytest.mark.parametrize("num_layers", [2, 6, 30])
@pytest.mark.parametrize("max_rate", [0.0, 0.2, 1.0])
def test_schedules_match_their_formulas(num_layers, max_rate):
    last = num_layers - 1
    expected = {
        "exponential": [max_rate * (2 ** (layer / last) - 1) for layer in range(num_layers)],
        "linear": [max_rate * layer / last for layer in range(num_layers)],
        "uniform": [max_rate] * num_layers,
    }
    for scale, rates in expected.items():
        assert layer_dropout_rates(num_layers, max_rate, scale) == pytest.approx(rates, abs=1e-12)


def test_exponential_schedule_runs_from_zero_to_the_max():
    rates = layer_dropout_rates(NUM_LAYERS, 0.4, "exponential")
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    assert all(earlier < later for earlier, later in zip(rates, rates[1:]))


def test_layers_outside_the_droppable_set_get_rate_zero():
    full = layer_dropout_rates(NUM_LAYERS, 0.5, "linear")
    subset = layer_dropout_rates(NUM_LAYERS, 0.5, "linear", layers=[2, 5])
    assert subset == [0.0, 0.0, full[2], 0.0, 0.0, full[5]]


@pytest.mark.parametrize("arguments, bad", [((6, 1.5, "linear"), "1.5"), ((6, 0.1, "cubic"), "'cubic'")])
def test_schedule_rejects_bad_arguments(arguments, bad):
    with pytest.raises(ValueError, match=bad):
        layer_dropout_rates(*arguments)


# Masks.


def test_masks_have_one_row_per_layer_and_one_column_per_sample():
    masks = sample_keep_masks([0.0, 0.5, 1.0], batch_size=7, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (3, 7) and masks.dtype == torch.bool
    assert masks[0].all() and not masks[2].any()


def test_same_seed_gives_same_masks_and_different_seeds_differ():
    rates = [0.5] * NUM_LAYERS

    def draw(seed):
        return sample_keep_masks(rates, batch_size=8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_drop_frequency_follows_the_rate():
    rates = layer_dropout_rates(NUM_LAYERS, 0.8, "exponential")
    masks = sample_keep_masks(rates, batch_size=20_000, generator=torch.Generator().manual_seed(0))
    drop_frequency = (~masks).float().mean(dim=1)
    assert_close(drop_frequency, torch.tensor(rates), atol=0.015, rtol=0)


def test_model_draws_masks_from_its_config_schedule():
    model = tiny_model(layer_dropout_max=0.6, layer_dropout_scale="linear", layer_dropout_layers=[1, 2, 4]).train()
    drawn = model.model.draw_keep_masks(16, generator=torch.Generator().manual_seed(5))
    rates = layer_dropout_rates(NUM_LAYERS, 0.6, "linear", [1, 2, 4])
    assert torch.equal(drawn, sample_keep_masks(rates, 16, torch.Generator().manual_seed(5)))
    assert model.eval().model.draw_keep_masks(16, generator=torch.Generator().manual_seed(5)) is None


# What the model computes.


def test_rate_one_skips_the_layer(batch):
    input_ids, attention_mask = batch
    model = tiny_model().train()
    for layer in range(NUM_LAYERS):
        rates = [1.0 if index == layer else 0.0 for index in range(NUM_LAYERS)]
        logits = model(input_ids, attention_mask=attention_mask, layer_dropout_rates=rates).logits
        expected = llama_without_layers(model, {layer})(input_ids, attention_mask=attention_mask).logits
        assert_close_where_attended(logits, expected, attention_mask)


def test_rate_one_everywhere_is_the_identity():
    input_ids = torch.randint(0, 128, (3, 7))
    model = tiny_model().train()
    logits = model(input_ids, layer_dropout_rates=[1.0] * NUM_LAYERS).logits
    assert_close(logits, model.lm_head(model.model.norm(model.model.embed_tokens(input_ids))))


def test_rate_zero_changes_nothing(batch):
    input_ids, attention_mask = batch
    model = tiny_model(layer_dropout_max=0.0).train()
    expected = model.eval()(input_ids, attention_mask=attention_mask).logits
    model.train()
    assert_close(model(input_ids, attention_mask=attention_mask).logits, expected)
    zeros = [0.0] * NUM_LAYERS
    assert_close(model(input_ids, attention_mask=attention_mask, layer_dropout_rates=zeros).logits, expected)


def test_eval_mode_disables_layer_dropout(batch):
    input_ids, attention_mask = batch
    model = tiny_model(layer_dropout_max=1.0, layer_dropout_scale="uniform")
    expected = llama_without_layers(model, set())(input_ids, attention_mask=attention_mask).logits
    logits = model(input_ids, attention_mask=attention_mask, layer_dropout_rates=[1.0] * NUM_LAYERS).logits
    assert_close(logits, expected)
    assert_close(model(input_ids, attention_mask=attention_mask).logits, expected)


def test_one_layer_runs_on_kept_rows_and_passes_dropped_rows_through(batch):
    input_ids, attention_mask = batch
    model = tiny_model().train()
    hidden = model.model.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    layer = 2
    keep_masks = torch.ones(NUM_LAYERS, 4, dtype=torch.bool)
    keep_masks[layer] = torch.tensor([True, False, True, False])
    full = model.model.run_layers(hidden, layer, layer + 1, position_ids, attention_mask)
    partial = model.model.run_layers(hidden, layer, layer + 1, position_ids, attention_mask, keep_masks=keep_masks)
    kept, dropped = keep_masks[layer], ~keep_masks[layer]
    assert_close_where_attended(partial[kept], full[kept], attention_mask[kept])
    assert torch.equal(partial[dropped], hidden[dropped])


def test_per_sample_masks_match_a_per_row_reference(batch):
    input_ids, attention_mask = batch
    model = tiny_model().train()
    # Layer 1 splits the batch, layer 3 splits it differently (one padded row each), layer 4 drops every row.
    keep_masks = torch.ones(NUM_LAYERS, 4, dtype=torch.bool)
    keep_masks[1] = torch.tensor([True, False, True, False])
    keep_masks[3] = torch.tensor([False, False, True, True])
    keep_masks[4] = False
    hidden = model.model.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    output = model.model.run_layers(hidden, 0, NUM_LAYERS, position_ids, attention_mask, keep_masks=keep_masks)
    expected = per_row_reference(model, input_ids, attention_mask, keep_masks)
    assert_close_where_attended(model.exit_logits(output), expected, attention_mask)


def test_forward_with_a_seeded_generator_matches_the_per_row_reference(batch):
    input_ids, attention_mask = batch
    model = tiny_model(layer_dropout_max=0.7, layer_dropout_scale="uniform").train()
    keep_masks = sample_keep_masks([0.7] * NUM_LAYERS, 4, torch.Generator().manual_seed(11))
    # The seed must exercise the per-sample path: some layer keeps some rows and drops others.
    assert (keep_masks.any(dim=1) & ~keep_masks.all(dim=1)).any()
    generator = torch.Generator().manual_seed(11)
    logits = model(input_ids, attention_mask=attention_mask, layer_dropout_generator=generator).logits
    expected = per_row_reference(model, input_ids, attention_mask, keep_masks)
    assert_close_where_attended(logits, expected, attention_mask)


def test_same_seed_gives_same_logits_and_different_seeds_differ():
    input_ids = torch.randint(0, 128, (8, 6))
    model = tiny_model(layer_dropout_max=0.5, layer_dropout_scale="uniform").train()

    def logits(seed):
        return model(input_ids, layer_dropout_generator=torch.Generator().manual_seed(seed)).logits

    assert torch.equal(logits(0), logits(0))
    assert not torch.allclose(logits(0), logits(1))


def test_rates_need_one_entry_per_layer():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="one rate per layer"):
        model(torch.zeros(1, 3, dtype=torch.long), layer_dropout_rates=[0.1] * (NUM_LAYERS - 1))


def test_output_hidden_states_is_refused_while_layers_drop():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="output_layer_hidden_states"):
        model(torch.zeros(2, 3, dtype=torch.long), layer_dropout_rates=[0.5] * NUM_LAYERS, output_hidden_states=True)


# Gradients.


def _layer_grads(model, layer):
    return [parameter.grad for parameter in model.model.layers[layer].parameters()]


def test_gradients_flow_through_kept_layers_only():
    model = tiny_model().train()
    rates = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    input_ids = torch.randint(0, 128, (3, 8))
    model(input_ids, labels=input_ids, layer_dropout_rates=rates).loss.backward()
    assert all(grad is None for grad in _layer_grads(model, 2))
    for layer in (0, 1, 3, 4, 5):
        assert all(grad is not None and grad.abs().sum() > 0 for grad in _layer_grads(model, layer))
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_dropped_rows_send_no_gradient_through_the_layer():
    model = tiny_model().train()
    input_ids = torch.randint(0, 128, (2, 8))
    keep_masks = torch.ones(NUM_LAYERS, 2, dtype=torch.bool)
    keep_masks[3] = torch.tensor([True, False])  # row 0 runs layer 3, row 1 skips it
    position_ids = torch.arange(8)[None]

    def row_loss_grads(row):
        model.zero_grad(set_to_none=True)
        hidden = model.model.run_layers(
            model.model.embed_tokens(input_ids), 0, NUM_LAYERS, position_ids, keep_masks=keep_masks
        )
        model.exit_logits(hidden)[row].logsumexp(dim=-1).sum().backward()
        return _layer_grads(model, 3)

    assert all(grad.abs().sum() > 0 for grad in row_loss_grads(0))
    assert all(grad is None or grad.abs().sum() == 0 for grad in row_loss_grads(1))
