"""SmolLM2-135M-Instruct converted from its GGUF file decodes exactly like the GGUF loaded by transformers."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.conversion import convert
from hf_layerskip.defaults import fetch_default_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain what a binary search does in one sentence.",
    "Give me a synonym for 'happy'.",
]
MAX_NEW_TOKENS = 32


@pytest.mark.real_model
def test_converted_smollm2_matches_the_gguf_model(tmp_path):
    gguf_path = fetch_default_gguf()
    checkpoint = convert(gguf_path, tmp_path / "smollm2-layerskip", exit_layer=8)
    converted = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    assert isinstance(converted, LayerSkipLlamaForCausalLM)
    assert converted.config.num_hidden_layers == 30 and converted.config.exit_layer == 8
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()

    # One left-padded batch of the five chat-templated prompts; both models see the same tensors.
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    inputs = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, padding=True, return_dict=True, return_tensors="pt"
    )
    attended = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert_close(converted(**inputs).logits[attended], reference(**inputs).logits[attended])
    greedy = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    outputs = converted.generate(**inputs, **greedy)
    expected = reference.generate(**inputs, **greedy)
    prompt_length = inputs["input_ids"].shape[1]
    for prompt, output, reference_output in zip(PROMPTS, outputs, expected):
        text, reference_text = (tokenizer.decode(ids[prompt_length:], skip_special_tokens=True) for ids in (output, reference_output))
        assert text.strip(), prompt
        assert torch.equal(output, reference_output), (prompt, text, reference_text)
