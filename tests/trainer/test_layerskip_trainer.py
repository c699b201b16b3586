"""LayerSkipTrainer on a tiny model: the recipe's defaults, the loss against a reference, logging, gradient
accumulation, mixed precision, evaluation, and an interrupted run resumed from its checkpoint."""

import pytest
import torch
from conftest import tiny_model
from trainer_helpers import (
    CaptureLogs,
    assert_same_parameters,
    parameters,
    per_layer_loop_loss,
    token_dataset,
    training_args,
)
from transformers import TrainerCallback, TrainingArguments

from hf_layerskip.trainer import LayerSkipTrainer, layer_dropout_generator


def test_without_layerskip_arguments_the_recipe_comes_from_the_model_config(tmp_path):
    model = tiny_model()
    trainer = LayerSkipTrainer(model, training_args(tmp_path))
    recipe = trainer.layerskip_recipe
    assert recipe.layer_dropout.max_rate == model.config.layer_dropout_max > 0
    assert recipe.layer_dropout.scale == model.config.layer_dropout_scale
    assert recipe.loss_scale == model.config.early_exit_loss_scale > 0
    assert recipe.layer_weighting == model.config.early_exit_layer_weighting
    assert recipe.curriculum.period == model.config.early_exit_curriculum_period
    assert trainer.args.ddp_find_unused_parameters is True  # layer dropout on


def test_plain_training_arguments_also_take_the_config_recipe(tmp_path):
    model = tiny_model(layer_dropout_max=0.3, early_exit_curriculum="gradual")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    recipe = LayerSkipTrainer(model, args).layerskip_recipe
    assert recipe.layer_dropout.max_rate == 0.3
    assert recipe.curriculum.fraction == model.config.early_exit_gradual_fraction


def test_arguments_override_the_model_config(tmp_path):
    args = training_args(
        tmp_path,
        layer_dropout_max=0.0,
        early_exit_loss_scale=0.5,
        early_exit_layer_weighting="inverse",
        early_exit_curriculum="none",
    )
    trainer = LayerSkipTrainer(tiny_model(), args)
    recipe = trainer.layerskip_recipe
    assert not recipe.layer_dropout.enabled
    assert (recipe.loss_scale, recipe.layer_weighting, type(recipe.curriculum).__name__) == (
        0.5,
        "inverse",
        "NoCurriculum",
    )
    assert trainer.args.ddp_find_unused_parameters is None  # left to the Trainer when nothing is dropped


@pytest.mark.parametrize(
    "override,message",
    [
        (dict(early_exit_loss_scale=2.0), "early_exit_loss_scale"),
        (dict(layer_dropout_layers=[9]), "layer_dropout_layers"),
        (dict(early_exit_curriculum_period=0), "period"),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        LayerSkipTrainer(tiny_model(), training_args(tmp_path, **override))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_training_loss_equals_reference_with_the_steps_dropout_masks(tmp_path, family):
    args = training_args(tmp_path, layer_dropout_max=0.6, layer_dropout_scale="uniform", early_exit_curriculum_period=2)
    model = tiny_model(family=family)
    trainer = LayerSkipTrainer(model, args)
    trainer.state.global_step, trainer.state.max_steps = 3, 10
    batch = {key: torch.stack([sample[key] for sample in token_dataset(4)]) for key in ("input_ids", "labels")}
    model.train()
    loss = trainer.compute_loss(model, batch)

    layers, weights = trainer.layerskip_recipe.exits(3, 10)
    assert layers == [1, 3, 5]  # step 3, period 2: the odd early layers (layer 1 weighs > 0 under cumulative)
    rates = trainer.layerskip_recipe.layer_dropout.rates(3, 10)
    outputs_kwargs = dict(layer_dropout_rates=rates, layer_dropout_generator=layer_dropout_generator(args.seed, 3, 0))
    reference = per_layer_loop_loss_with(model, batch, layers, weights, outputs_kwargs)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    # Another micro-batch of the same step draws other masks, hence another loss.
    assert not torch.allclose(trainer.compute_loss(model, batch), loss)


def per_layer_loop_loss_with(model, batch, layers, weights, forward_kwargs):
    original_forward = model.forward

    def forward(*args, **kwargs):
        return original_forward(*args, **kwargs, **forward_kwargs)

    model.forward = forward
    try:
        attention_mask = torch.ones_like(batch["input_ids"])
        return per_layer_loop_loss(model, batch["input_ids"], batch["labels"], attention_mask, layers, weights)
    finally:
        del model.forward


def test_logs_per_exit_losses_and_active_exits_through_the_trainer_logging(tmp_path):
    capture = CaptureLogs()
    args = training_args(tmp_path, max_steps=4, early_exit_curriculum_period=2)
    trainer = LayerSkipTrainer(tiny_model(), args, train_dataset=token_dataset(), callbacks=[capture])
    trainer.train()
    train_logs = [log for log in capture.logs if "loss" in log]
    assert [log["step"] for log in train_logs] == [1, 2, 3, 4]
    for log in train_logs:
        layers, _ = trainer.layerskip_recipe.exits(log["step"] - 1, 4)
        logged = sorted(int(key.rsplit("_", 1)[1]) for key in log if key.startswith("early_exit_loss/layer_"))
        assert logged == layers
        assert log["early_exit/active_exits"] == len(layers)
        assert log["layer_dropout/mean_rate"] > 0
        # The last exit is the plain LM loss; with one exit active it is the whole loss.
        if layers == [5]:
            assert log["early_exit_loss/layer_5"] == pytest.approx(log["loss"], rel=1e-4)


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    # Micro-batches with different numbers of targets: the loss must be normalised over the accumulated batch.
    data = token_dataset(8)
    for index, sample in enumerate(data):
        sample["labels"] = sample["labels"].clone()
        sample["labels"][: 3 * index] = -100
    # SGD: Adam's normalisation would magnify rounding differences of near-zero gradients.
    common = dict(
        layer_dropout_max=0.0,
        early_exit_curriculum="none",
        early_exit_layer_weighting="linear",
        max_steps=2,
        optim="sgd",
        learning_rate=0.5,
    )
    accumulated = tiny_model()
    LayerSkipTrainer(
        accumulated,
        training_args(tmp_path / "ga", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        train_dataset=data,
    ).train()
    single = tiny_model()
    LayerSkipTrainer(
        single, training_args(tmp_path / "one", per_device_train_batch_size=4, **common), train_dataset=data
    ).train()
    assert_same_parameters(parameters(accumulated), parameters(single), rtol=1e-4, atol=1e-6)
    assert not torch.equal(parameters(single)["lm_head.weight"], tiny_model().lm_head.weight)


def test_bf16_mixed_precision_trains_close_to_fp32(tmp_path):
    losses = {}
    for bf16 in (False, True):
        capture = CaptureLogs()
        args = training_args(tmp_path / str(bf16), bf16=bf16, max_steps=2, layer_dropout_max=0.0)
        LayerSkipTrainer(tiny_model(), args, train_dataset=token_dataset(), callbacks=[capture]).train()
        losses[bf16] = [log["loss"] for log in capture.logs if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses[True])))
    assert losses[True] == pytest.approx(losses[False], rel=0.02)


def test_evaluation_reports_the_plain_last_layer_loss(tmp_path):
    model = tiny_model()
    eval_data = token_dataset(4, seed=3)
    trainer = LayerSkipTrainer(model, training_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=eval_data)
    metrics = trainer.evaluate()
    ids = torch.stack([sample["input_ids"] for sample in eval_data])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


class Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_with_the_same_data_order_curriculum_and_masks(tmp_path):
    """8 steps of 2 micro-batches over 20 samples (5 steps an epoch), gradual curriculum (depends on max_steps),
    layer dropout on, interrupted after the step-6 checkpoint and resumed: identical to an uninterrupted run."""

    def run(output_dir, callbacks=(), resume=None):
        args = training_args(
            output_dir,
            max_steps=8,
            gradient_accumulation_steps=2,
            save_strategy="steps",
            save_steps=3,
            layer_dropout_max=0.5,
            early_exit_curriculum="gradual",
            early_exit_gradual_fraction=0.75,
        )
        capture = CaptureLogs()
        model = tiny_model()
        trainer = LayerSkipTrainer(model, args, train_dataset=token_dataset(20), callbacks=[capture, *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        return parameters(model), [log for log in capture.logs if "loss" in log]

    uninterrupted, full_logs = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[Interrupt(at_step=7)])
    assert (tmp_path / "cut" / "checkpoint-6").is_dir()
    resumed, resumed_logs = run(tmp_path / "cut", resume=True)

    assert [log["step"] for log in resumed_logs] == [7, 8]  # no step lost, none repeated
    for resumed_log, full_log in zip(resumed_logs, full_logs[6:]):
        assert resumed_log.keys() == full_log.keys()
        for key in resumed_log:
            if key not in ("epoch",):
                assert resumed_log[key] == pytest.approx(full_log[key], rel=1e-5), key
    assert_same_parameters(resumed, uninterrupted, rtol=1e-5, atol=1e-7)
