"""LoRA adapters trained on the early-exit objective: frozen base, save and load, and generation on the adapted
and merged models (self-speculative greedy equals plain greedy)."""

import torch
from conftest import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from trainer_helpers import parameters, token_dataset, training_args

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
