"""The default checkpoint: the converted base with the shipped draft head, built once per draft-head version; and a
LoRA adapter merged as peft merges it."""

import json

import pytest
import torch
from test_conversion import VOCAB_SIZE, save_tiny_adapter, save_tiny_llama

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.conversion import convert
from hf_layerskip.defaults import (
    BASE_CHECKPOINT_NAME,
    SETTINGS_FILE_NAME,
    build_from_adapter,
    build_from_draft_head,
    default_checkpoint,
    export_draft_head,
)
from hf_layerskip.modeling.draft_head import ExitAdapter


@pytest.fixture
def base(tmp_path):
    save_tiny_llama(tmp_path / "llama", num_layers=4)
    return convert(tmp_path / "llama", tmp_path / "base")


# Per-module ranks and scales, and rsLoRA's alpha / sqrt(r): merging must follow peft's reading of each.
ADAPTER_VARIANTS = {
    "plain": {},
    "patterns": dict(rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3}),
    "rslora": dict(use_rslora=True, rank_pattern={"q_proj": 8}),
}


@pytest.mark.parametrize("variant", ADAPTER_VARIANTS)
def test_built_checkpoint_has_the_adapter_and_its_settings(base, tmp_path, variant):
    model = LayerSkipLlamaForCausalLM.from_pretrained(base).eval()
    adapted = save_tiny_adapter(model, tmp_path / "adapter", **ADAPTER_VARIANTS[variant])
    (tmp_path / "adapter" / SETTINGS_FILE_NAME).write_text(json.dumps({"exit_layer": 3, "num_speculations": 2}))
    built = LayerSkipLlamaForCausalLM.from_pretrained(build_from_adapter(base, tmp_path / "adapter", tmp_path / "out"))
    assert (built.config.exit_layer, built.config.num_speculations) == (3, 2)
    assert built.generation_config.num_assistant_tokens == 2
    input_ids = torch.randint(3, VOCAB_SIZE, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, adapted(input_ids).logits, atol=1e-3)
        torch.testing.assert_close(built.eval()(input_ids).logits, adapted(input_ids).logits, atol=1e-5, rtol=1e-5)
    ranks = {name: module.lora_A["default"].out_features for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    expected_rank = ADAPTER_VARIANTS[variant].get("rank_pattern", {}).get("v_proj", 4)
    assert ranks["base_model.model.model.layers.0.self_attn.v_proj"] == expected_rank  # the pattern took effect


def test_bad_settings_file_names_the_field(base, tmp_path):
    save_tiny_adapter(LayerSkipLlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    (tmp_path / "adapter" / SETTINGS_FILE_NAME).write_text(json.dumps({"exit_layer": 9}))
    with pytest.raises(ValueError, match="exit_layer"):
        build_from_adapter(base, tmp_path / "adapter", tmp_path / "out")


def draft_head_files(base, directory, seed: int, decoding=None):
    """A random draft head on `base`, exported to `directory`; returns the model it was exported from."""
    model = LayerSkipLlamaForCausalLM.from_pretrained(base).eval()
    generator = torch.Generator().manual_seed(seed)
    adapter = ExitAdapter(model.config.hidden_size, rank=4)
    with torch.no_grad():
        adapter.up.normal_(std=0.3, generator=generator)
    model.set_draft_head({2: adapter}, torch.randperm(VOCAB_SIZE, generator=generator)[:20])
    export_draft_head(model, directory, decoding)
    return model


def test_built_checkpoint_has_the_draft_head_and_its_decoding_settings(base, tmp_path):
    decoding = {"exit_layer": 2, "num_speculations": 3, "assistant_confidence_threshold": 0.4}
    exported = draft_head_files(base, tmp_path / "head", seed=0, decoding=decoding)
    built = LayerSkipLlamaForCausalLM.from_pretrained(build_from_draft_head(base, tmp_path / "head", tmp_path / "out"))
    assert (built.config.exit_layer, built.config.num_speculations) == (2, 3)
    assert built.generation_config.num_assistant_tokens == 3
    assert built.generation_config.assistant_confidence_threshold == 0.4
    for name, tensor in exported.draft_head.state_dict().items():
        assert torch.equal(built.draft_head.state_dict()[name], tensor), name
    # The model's own weights are the base's: only drafting changes.
    plain = LayerSkipLlamaForCausalLM.from_pretrained(base)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"Unknown decoding settings \['num_beams'\]"):
        export_draft_head(exported, tmp_path / "bad", {"num_beams": 2})


def test_default_checkpoint_is_built_once_per_draft_head_version(base, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / BASE_CHECKPOINT_NAME).symlink_to(base, target_is_directory=True)
    monkeypatch.setattr("hf_layerskip.defaults.DEFAULT_DRAFT_HEAD_DIR", tmp_path / "no-draft-head")
    assert default_checkpoint(cache) == cache / BASE_CHECKPOINT_NAME

    head = tmp_path / "head"
    draft_head_files(base, head, seed=1)
    monkeypatch.setattr("hf_layerskip.defaults.DEFAULT_DRAFT_HEAD_DIR", head)
    first = default_checkpoint(cache)
    assert first.parent == cache and first != cache / BASE_CHECKPOINT_NAME
    modified = first.stat().st_mtime_ns
    assert default_checkpoint(cache) == first and first.stat().st_mtime_ns == modified

    draft_head_files(base, head, seed=2)
    second = default_checkpoint(cache)
    assert second != first
    adapters = [LayerSkipLlamaForCausalLM.from_pretrained(path).draft_head.adapter(2).up for path in (first, second)]
    assert not torch.equal(*adapters)
