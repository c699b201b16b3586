"""LoRA adapters trained on the early-exit objective: frozen base, save and load, and generation on the adapted
and merged models (self-speculative greedy equals plain greedy)."""

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from trainer_helpers import parameters, per_layer_loop_distillation_loss, token_dataset, training_args

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.trainer import LayerSkipTrainer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(seed=0):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(tiny_model(seed), config)


def train_adapter(tmp_path, steps=3):
    model = lora_model()
    args = training_args(tmp_path, max_steps=steps, learning_rate=2e-2, layer_dropout_max=0.3)
    trainer = LayerSkipTrainer(model, args, train_dataset=token_dataset())
    before = parameters(model)
    trainer.train()
    return trainer, model, before


def test_three_steps_change_the_adapter_and_not_the_base(tmp_path):
    _, model, before = train_adapter(tmp_path)
    after = parameters(model)
    adapter = [name for name in after if "lora_" in name]
    assert len(adapter) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    for name in after:
        if name in adapter:
            assert not torch.equal(after[name], before[name]), f"adapter parameter {name} did not change"
        else:
            assert torch.equal(after[name], before[name]), f"base parameter {name} changed"


def test_adapter_round_trips_and_speculative_greedy_equals_plain_greedy(tmp_path):
    trainer, trained, _ = train_adapter(tmp_path)
    trainer.save_model(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    trained.eval()
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=prompt).logits, trained(input_ids=prompt).logits)

    greedy = dict(max_new_tokens=24, do_sample=False)
    plain = loaded.generate(input_ids=prompt, **greedy)
    speculative = loaded.generate(input_ids=prompt, assistant_early_exit=2, num_assistant_tokens=3, **greedy)
    assert torch.equal(speculative, plain)
    # The PeftModel reached our self-speculative decoder, not transformers' fallback.
    assert loaded.get_base_model().speculation_stats.drafted_tokens > 0
    early = loaded.generate(input_ids=prompt, early_exit=2, **greedy)

    merged = loaded.merge_and_unload()
    assert type(merged) is LayerSkipLlamaForCausalLM
    merged_plain = merged.generate(input_ids=prompt, **greedy)
    assert torch.equal(merged_plain, plain)
    merged_speculative = merged.generate(input_ids=prompt, assistant_early_exit=2, num_assistant_tokens=3, **greedy)
    assert torch.equal(merged_speculative, merged_plain)
    assert torch.equal(merged.generate(input_ids=prompt, early_exit=2, **greedy), early)


def test_adapter_changes_the_models_output(tmp_path):
    """Guards the round-trip test against a no-op adapter: the trained adapter must move the logits."""
    _, trained, _ = train_adapter(tmp_path)
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = trained.eval()(input_ids=prompt).logits
        base = tiny_model()(input_ids=prompt).logits
    assert (adapted - base).abs().max() > 1e-3


def test_distillation_loss_is_the_per_layer_loop_against_the_adapter_free_model(tmp_path):
    model = lora_model()
    settings = dict(
        layer_dropout_max=0.0,
        early_exit_curriculum="fixed",
        early_exit_layers=[1],
        early_exit_layer_weighting="uniform",
        early_exit_loss_scale=0.5,
        distillation_weight=0.7,
    )
    args = training_args(tmp_path, max_steps=2, learning_rate=2e-2, **settings)
    trainer = LayerSkipTrainer(model, args, train_dataset=token_dataset())
    trainer.train()  # moves the adapter away from zero, so adapted and adapter-free models differ

    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
    attention_mask = torch.ones_like(input_ids)
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": input_ids, "labels": input_ids, "attention_mask": attention_mask})
    layers, weights = trainer.layerskip_recipe.exits(trainer.state.global_step, trainer.state.max_steps)
    assert layers == [1, model.config.num_hidden_layers - 1]
    base_model = tiny_model()  # the frozen base weights, as the adapter-free model has them
    reference = per_layer_loop_distillation_loss(
        model, base_model, input_ids, input_ids, attention_mask, layers, weights, alpha=0.7
    )
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), model.disable_adapter():
        teacher_logits = model(input_ids=input_ids).logits
    assert (teacher_logits - model(input_ids=input_ids).logits).abs().max() > 1e-3


def test_distillation_without_adapters_is_refused(tmp_path):
    args = training_args(tmp_path, distillation_weight=0.5)
    with pytest.raises(ValueError, match="distillation_weight.*PeftModel.*LayerSkipLlamaForCausalLM"):
        LayerSkipTrainer(tiny_model(), args, train_dataset=token_dataset())


def test_untrained_adapter_distils_nothing_at_the_last_layer_even_with_dropout_in_the_config(tmp_path):
    """A fresh adapter is the identity, so the last layer's KL to the adapter-free model is 0: the teacher runs
    without the layer dropout the model config asks for in training."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model(layer_dropout_max=0.9), config).train()
    args = training_args(
        tmp_path, layer_dropout_max=0.0, early_exit_curriculum="fixed", early_exit_layers=[1], distillation_weight=1.0
    )
    trainer = LayerSkipTrainer(model, args, train_dataset=token_dataset())
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    trainer.compute_loss(model, {"input_ids": input_ids, "labels": input_ids})
    last = model.config.num_hidden_layers - 1
    assert trainer._layerskip_metrics[f"early_exit_loss/layer_{last}"][0].item() < 1e-6
    assert trainer._layerskip_metrics["early_exit_loss/layer_1"][0].item() > 1e-3
