"""LayerSkipLlamaForCausalLM against a plain LlamaForCausalLM with the same weights: logits, exits, checkpoints."""

import json

import pytest
import torch
from conftest import tiny_model
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from hf_layerskip import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM

NUM_LAYERS = 6


def plain_llama(model: LayerSkipLlamaForCausalLM) -> LlamaForCausalLM:
    """An independent `LlamaForCausalLM` holding a copy of `model`'s weights."""
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    llama = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    llama.load_state_dict(model.state_dict())
    return llama


@pytest.fixture
def padded_batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 128, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    return input_ids, attention_mask


def greedy_loop(model, input_ids, max_new_tokens, **forward_kwargs):
    """Greedy decoding the slow way: the whole sequence through `forward`, no cache, one token at a time."""
    for _ in range(max_new_tokens):
        next_token = model(input_ids, use_cache=False, **forward_kwargs).logits[:, -1].argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


# Without dropout, it is Llama.


def test_eval_logits_equal_llama(model, padded_batch):
    input_ids, attention_mask = padded_batch
    attended = attention_mask.bool()
    expected = plain_llama(model)(input_ids, attention_mask=attention_mask).logits
    assert_close(model(input_ids, attention_mask=attention_mask).logits[attended], expected[attended])


def test_training_logits_without_dropout_equal_llama(padded_batch):
    input_ids, attention_mask = padded_batch
    model = tiny_model(layer_dropout_max=0.0)
    llama = plain_llama(model)
    model.train(), llama.train()
    attended = attention_mask.bool()
    logits = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    expected = llama(input_ids, attention_mask=attention_mask, labels=input_ids)
    assert_close(logits.logits[attended], expected.logits[attended])
    assert_close(logits.loss, expected.loss)


def test_cached_decoding_equals_llama(model):
    input_ids = torch.randint(0, 128, (2, 7))
    llama = plain_llama(model)
    prefix = model(input_ids[:, :5], use_cache=True)
    step = model(input_ids[:, 5:], cache=prefix.cache)
    expected = llama(input_ids).logits
    assert_close(torch.cat([prefix.logits, step.logits], dim=1), expected)


# Early exit.


def test_one_token_on_a_static_cache_without_a_mask_equals_llama(model):
    """A static layer holds all its `max_cache_len` slots, the unwritten ones too: one query token needs a mask."""
    from transformers import StaticCache

    llama = plain_llama(model)
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name, decoder in (("ours", model), ("llama", llama)):
        cache = StaticCache(config=model.config, max_cache_len=32)
        decoder(input_ids[:, :-1], cache=cache, use_cache=True)
        logits[name] = decoder(input_ids[:, -1:], cache=cache, use_cache=True).logits
    assert_close(logits["ours"], logits["llama"])
    assert_close(logits["ours"][:, -1], llama(input_ids).logits[:, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exit_layer", range(1, NUM_LAYERS + 1))
def test_early_exit_logits_are_norm_and_head_on_that_layers_output(model, exit_layer):
    input_ids = torch.randint(0, 128, (2, 8))
    reference = plain_llama(model)(input_ids, output_hidden_states=True)
    if exit_layer < NUM_LAYERS:
        # hidden_states[E] is layer E's output before the norm (the last entry is replaced by the normed one).
        expected = model.lm_head(model.model.norm(reference.hidden_states[exit_layer]))
    else:
        expected = reference.logits
    assert_close(model(input_ids, exit_layer=exit_layer).logits, expected)


def test_layer_hidden_states_are_each_layers_output_before_the_norm(model):
    input_ids = torch.randint(0, 128, (2, 8))
    full = model(input_ids, output_layer_hidden_states=True)
    assert len(full.layer_hidden_states) == NUM_LAYERS
    assert_close(model.exit_logits(full.layer_hidden_states[-1]), full.logits)
    for exit_layer in range(1, NUM_LAYERS):
        early = model(input_ids, exit_layer=exit_layer, output_layer_hidden_states=True)
        assert len(early.layer_hidden_states) == exit_layer
        assert_close(early.logits, model.exit_logits(full.layer_hidden_states[exit_layer - 1]))


@pytest.mark.parametrize("exit_layer", [0, NUM_LAYERS + 1, 2.5, True])
def test_bad_exit_layer_is_rejected(model, exit_layer):
    with pytest.raises(ValueError, match=f"got {exit_layer!r}"):
        model(torch.zeros(1, 3, dtype=torch.long), exit_layer=exit_layer)


# Generation.


def test_plain_generate_equals_a_greedy_loop_and_llama(model):
    input_ids = torch.randint(0, 128, (1, 5))
    generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, greedy_loop(model, input_ids, 12))
    assert torch.equal(generated, plain_llama(model).generate(input_ids, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("exit_layer", [1, 3, NUM_LAYERS])
def test_early_exit_generate_equals_a_greedy_loop_over_the_exit(model, exit_layer):
    input_ids = torch.randint(0, 128, (2, 5))
    generated = model.generate(input_ids, max_new_tokens=12, do_sample=False, early_exit=exit_layer)
    assert torch.equal(generated, greedy_loop(model, input_ids, 12, exit_layer=exit_layer))


def test_early_exit_and_assistant_early_exit_are_exclusive(model):
    with pytest.raises(ValueError, match="either `early_exit`"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, early_exit=2, assistant_early_exit=2)


# Checkpoints.


def test_our_checkpoint_loads_into_llama(model, tmp_path):
    input_ids = torch.randint(0, 128, (2, 8))
    model.save_pretrained(tmp_path)
    llama = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert type(llama) is LlamaForCausalLM
    assert_close(llama(input_ids).logits, model(input_ids).logits)


def test_llama_checkpoint_loads_into_ours(tmp_path):
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama.save_pretrained(tmp_path)
    ours = LayerSkipLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(ours.config, LayerSkipLlamaConfig) and ours.config.exit_layer == 2
    input_ids = torch.randint(0, 128, (2, 8))
    assert_close(ours(input_ids).logits, llama(input_ids).logits)


def test_checkpoint_round_trips_with_settings_and_generation_defaults(tmp_path):
    model = tiny_model(exit_layer=4, num_speculations=3, layer_dropout_max=0.2)
    model.save_pretrained(tmp_path)
    loaded = LayerSkipLlamaForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(0, 128, (2, 8))
    assert_close(loaded(input_ids).logits, model(input_ids).logits)
    assert (loaded.config.exit_layer, loaded.config.num_speculations, loaded.config.layer_dropout_max) == (4, 3, 0.2)
    assert loaded.generation_config.num_assistant_tokens == 3


# transformers' keyword and output contracts, as stock Llama keeps them.


def test_past_key_values_keyword_continues_the_cache_as_llama(model):
    input_ids = torch.randint(0, 128, (2, 7))
    llama = plain_llama(model)

    def continued(m):
        prefix = m(input_ids[:, :4], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = m(input_ids[:, 4:], past_key_values=prefix.cache, use_cache=True)
        return torch.cat([prefix.logits, step.logits], dim=1)

    expected = continued(llama)
    assert_close(expected, llama(input_ids).logits, atol=1e-5, rtol=1e-5)
    assert_close(continued(model), expected, atol=1e-5, rtol=1e-5)


def test_peft_prefix_tuning_changes_logits_as_it_changes_llamas(model):
    peft = pytest.importorskip("peft")
    input_ids = torch.randint(0, 128, (2, 7))
    llama = plain_llama(model)
    untuned = llama(input_ids).logits

    def prefix_tuned(m):
        torch.manual_seed(1)
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        return peft.get_peft_model(m, config).eval()

    expected = prefix_tuned(llama)(input_ids=input_ids).logits
    assert (expected - untuned).abs().max() > 1e-2, "the prefix should change the logits"
    assert_close(prefix_tuned(model)(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_return_dict_false_gives_llamas_tuples(model, padded_batch):
    input_ids, attention_mask = padded_batch
    settings = dict(attention_mask=attention_mask, labels=input_ids, use_cache=True, output_hidden_states=True)
    expected = plain_llama(model)(input_ids, return_dict=False, **settings)
    as_argument = model(input_ids, return_dict=False, **settings)
    model.config.return_dict = False
    from_config = model(input_ids, **settings)
    for ours in (as_argument, from_config):
        assert type(ours) is tuple and len(ours) == len(expected) == 4  # loss, logits, cache, hidden states
        assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
        assert_close(ours[1], expected[1], atol=1e-5, rtol=1e-5)
        assert ours[2].get_seq_length() == expected[2].get_seq_length() == input_ids.shape[1]
        assert_close(ours[3], expected[3], atol=1e-5, rtol=1e-5)


def test_auto_model_builds_and_loads_the_base_model(model, tmp_path, padded_batch):
    from transformers import AutoModel, LlamaModel

    from hf_layerskip import LayerSkipLlamaModel

    assert type(AutoModel.from_config(model.config)) is LayerSkipLlamaModel
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_layerskip_llama.LayerSkipLlamaModel"
    )
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is LayerSkipLlamaModel
    input_ids, attention_mask = padded_batch
    attended = attention_mask.bool()
    expected = LlamaModel.from_pretrained(tmp_path).eval()(input_ids, attention_mask=attention_mask)
    ours = base(input_ids, attention_mask=attention_mask)
    assert_close(ours.last_hidden_state[attended], expected.last_hidden_state[attended], atol=1e-5, rtol=1e-5)
