"""Conversion of a Hugging Face checkpoint directory (each family) into a LayerSkip checkpoint (tiny, offline).

`tiny_tokenizer`, `save_tiny_llama` and `save_tiny_adapter` are also used by other tests.
"""

import copy
from pathlib import Path

import pytest
import torch
from conftest import OTHER_FAMILIES, stock_class, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_layerskip import FAMILIES, LayerSkipLlamaForCausalLM
from hf_layerskip.conversion import convert, load_as_layerskip

VOCAB_SIZE = 128
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `<unk> <s> </s> w0 ... w124`, built offline."""
    tokens = ["<unk>", "<s>", "</s>", *(f"w{index}" for index in range(VOCAB_SIZE - 3))]
    backend = Tokenizer(models.WordLevel({token: index for index, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llama(directory: Path, seed: int = 0, num_layers: int = 4, **config_overrides) -> LlamaForCausalLM:
    """Saves a random `LlamaForCausalLM`, its tokenizer and a generation config to `directory`; returns the model."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config_overrides,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, max_new_tokens=7)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture
def llama_dir(tmp_path):
    directory = tmp_path / "llama"
    return directory, save_tiny_llama(directory)


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_converted_checkpoint_gives_the_same_logits(tmp_path, tie_word_embeddings):
    source = tmp_path / "llama"
    llama = save_tiny_llama(source, tie_word_embeddings=tie_word_embeddings)
    output = convert(source, tmp_path / "layerskip")
    converted = LayerSkipLlamaForCausalLM.from_pretrained(output).eval()
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 9))
    assert_close(converted(input_ids).logits, llama(input_ids).logits)
    assert converted.config.tie_word_embeddings == tie_word_embeddings
    assert (output / "model.safetensors").is_file()


def test_loaded_model_runs_in_memory_before_saving(llama_dir):
    # Built on the meta device: the rotary tables, which no state dict holds, must be real tensors.
    source, llama = llama_dir
    model, _ = load_as_layerskip(source)
    assert not any(buffer.is_meta for buffer in model.buffers())
    input_ids = torch.randint(0, VOCAB_SIZE, (1, 6))
    assert_close(model(input_ids).logits, llama(input_ids).logits)


def test_settings_go_into_the_config_and_generation_config(llama_dir, tmp_path):
    source, _ = llama_dir
    settings = dict(exit_layer=3, num_speculations=4, layer_dropout_max=0.3, early_exit_curriculum="gradual")
    output = convert(source, tmp_path / "layerskip", **settings)
    converted = LayerSkipLlamaForCausalLM.from_pretrained(output)
    assert {name: getattr(converted.config, name) for name in settings} == settings
    assert converted.config.model_type == "layerskip_llama"
    generation_config = GenerationConfig.from_pretrained(output)
    assert generation_config.num_assistant_tokens == 4
    assert generation_config.assistant_confidence_threshold == 0.0
    # The source's own generation settings survive.
    assert (generation_config.max_new_tokens, generation_config.eos_token_id) == (7, 2)


def test_defaults_apply_when_no_setting_is_given(llama_dir, tmp_path):
    source, _ = llama_dir
    converted = LayerSkipLlamaForCausalLM.from_pretrained(convert(source, tmp_path / "layerskip"))
    assert converted.config.exit_layer == 1  # 4 layers // 4
    assert converted.config.num_speculations == 6


def test_tokenizer_is_saved_with_its_chat_template(llama_dir, tmp_path):
    source, _ = llama_dir
    output = convert(source, tmp_path / "layerskip")
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("w1 w7").input_ids == tiny_tokenizer()("w1 w7").input_ids
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_bfloat16_conversion(llama_dir, tmp_path):
    source, llama = llama_dir
    converted = LayerSkipLlamaForCausalLM.from_pretrained(convert(source, tmp_path / "bf16", dtype=torch.bfloat16))
    assert converted.dtype == torch.bfloat16
    assert_close(converted.model.embed_tokens.weight, llama.model.embed_tokens.weight.to(torch.bfloat16))


def test_bad_setting_value_is_rejected(llama_dir, tmp_path):
    source, _ = llama_dir
    with pytest.raises(ValueError, match="`exit_layer` must be in \\[1, 3\\], got 4"):
        convert(source, tmp_path / "layerskip", exit_layer=4)


def test_unknown_setting_is_rejected(llama_dir, tmp_path):
    source, _ = llama_dir
    with pytest.raises(ValueError, match="exit_layr"):
        convert(source, tmp_path / "layerskip", exit_layr=2)


def save_tiny_stock(directory: Path, family: str, num_layers: int = 4):
    """Saves a random stock model of `family` (the tiny config of `conftest`) and the tiny tokenizer; returns it."""
    layerskip_config = tiny_config(family, num_hidden_layers=num_layers, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    settings = {k: v for k, v in layerskip_config.to_dict().items() if k not in ("model_type", "architectures")}
    torch.manual_seed(0)
    stock = stock_class(FAMILIES[family][2])(stock_class(FAMILIES[family][0])(**settings)).eval()
    stock.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return stock


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_each_family_converts_and_loads_back_into_the_stock_class(tmp_path, family):
    source = tmp_path / family
    stock = save_tiny_stock(source, family)

    output = convert(source, tmp_path / "layerskip", exit_layer=2)
    converted = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(converted) is FAMILIES[family][2]
    assert converted.config.exit_layer == 2
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 9))
    assert_close(converted(input_ids).logits, stock(input_ids).logits)
    back = type(stock).from_pretrained(output).eval()
    assert_close(back(input_ids).logits, stock(input_ids).logits)


def test_unsupported_model_type_is_rejected_before_loading_weights(tmp_path):
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4)).save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"not weights")  # never read
    with pytest.raises(ValueError, match="model_type='gpt2'.*allowed: llama, qwen2"):
        convert(source, tmp_path / "layerskip")


def test_missing_tokenizer_gives_a_clear_error(tmp_path):
    source = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(source)
    with pytest.raises(ValueError, match="Could not load a tokenizer"):
        convert(source, tmp_path / "layerskip")


@pytest.mark.parametrize("source", ["missing.gguf", "no_config_dir"])
def test_missing_source_is_reported(tmp_path, source):
    (tmp_path / "no_config_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=source):
        convert(tmp_path / source, tmp_path / "layerskip")


def save_tiny_adapter(model, directory: Path, seed: int = 1, **lora_settings) -> torch.nn.Module:
    """Saves a LoRA adapter with random non-zero factors on `model` (left unchanged); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(**{**settings, **lora_settings}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.normal_(std=0.2)
    adapted.save_pretrained(directory)
    return adapted.eval()

