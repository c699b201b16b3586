"""Shared pieces of the trainer tests: reference loss, tiny datasets, arguments, parameter snapshots, ports."""

import socket

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from hf_layerskip.trainer import LayerSkipTrainingArguments


def per_layer_loop_loss(model, input_ids, labels, attention_mask, layers, weights):
    """Reference: each exit's full logits, the standard shifted cross-entropy, weighted."""
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
    )
    shifted = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    total = 0.0
    for layer, weight in zip(layers, weights):
        logits = model.exit_logits(outputs.layer_hidden_states[layer])[:, :-1]  # (batch, seq_len - 1, vocab)
        total = total + weight * F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token_dataset(num_samples=16, seq_len=16, seed=0, vocab_size=128):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        max_steps=3,
        seed=7,
    )
    settings.update(overrides)
    return LayerSkipTrainingArguments(**settings)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_parameters(left, right, **tolerance):
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], msg=name, **tolerance)


class CaptureLogs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII: fewer than 128 ids, EOS id 1."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{char: index + 2 for index, char in enumerate(string.printable)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def tiny_checkpoint(directory, **overrides):
    """Saves a tiny LayerSkip model with the character tokenizer to `directory`; returns the model."""
    from conftest import tiny_model

    model = tiny_model(**{"max_position_embeddings": 64, "eos_token_id": 1, **overrides})
    model.save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return model


def per_layer_loop_distillation_loss(model, teacher, input_ids, labels, attention_mask, layers, weights, alpha):
    """Reference: each exit's (1 − α)·cross-entropy + α·KL(teacher's last layer ‖ exit) over full logits."""
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_layer_hidden_states=True, use_cache=False
    )
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    shifted = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    has_target = shifted != -100
    teacher_log_probs = teacher_logits[:, :-1][has_target].log_softmax(dim=-1)  # (num_targets, vocab)
    total = 0.0
    for layer, weight in zip(layers, weights):
        logits = model.exit_logits(outputs.layer_hidden_states[layer])[:, :-1]  # (batch, seq_len - 1, vocab)
        log_probs = logits[has_target].log_softmax(dim=-1)
        cross_entropy = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        divergence = (teacher_log_probs.exp() * (teacher_log_probs - log_probs)).sum(dim=-1).mean()
        total = total + weight * ((1 - alpha) * cross_entropy + alpha * divergence)
    return total
