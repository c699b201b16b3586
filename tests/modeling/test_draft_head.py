"""The draft head (exit adapters, draft vocabulary): what the draft scores, against the shared exit it replaces;
greedy self-speculative decoding through it against plain greedy; checkpoints with it against stock Llama."""

import pytest
import torch
from conftest import tiny_model
from test_self_speculative import assert_same_as_plain, plain_greedy, positions_per_layer, prompt
from transformers import LlamaForCausalLM

from hf_layerskip import LayerSkipLlamaForCausalLM
from hf_layerskip.modeling.draft_head import ExitAdapter

NUM_LAYERS = 6


def random_adapter(hidden_size: int, rank: int | None = None, seed: int = 0) -> ExitAdapter:
    """An adapter far from the identity, so that it changes what the draft proposes."""
    torch.manual_seed(seed)
    adapter = ExitAdapter(hidden_size, rank)
    with torch.no_grad():
        adapter.up.normal_(std=0.3)
    return adapter


def with_draft_head(model, exit_layers=(2,), vocab_size: int | None = 40, rank: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(model.config.vocab_size, generator=generator)[:vocab_size] if vocab_size else None
    adapters = {layer: random_adapter(model.config.hidden_size, rank, seed + layer) for layer in exit_layers}
    model.set_draft_head(adapters, vocab)
    return model


def make_layers_after_the_exit_identities(model, exit_layer: int) -> None:
    """Zeroes the residual branches of layers E..L-1: the plain exit at E then drafts exactly the full model's tokens."""
    with torch.no_grad():
        for layer in model.model.layers[exit_layer:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("rank", [None, 8])
def test_a_fresh_adapter_is_the_identity(rank):
    model = tiny_model(exit_adapter_layers=[2, 4], exit_adapter_rank=rank)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    for layer in (2, 4):
        assert torch.equal(model.draft_head.adapter(layer).up, torch.zeros_like(model.draft_head.adapter(layer).up))
        torch.testing.assert_close(model.draft_exit(layer)(hidden), model.exit_logits(hidden))


def test_draft_scores_are_the_adapted_exit_over_the_draft_vocabulary(model):
    with_draft_head(model, exit_layers=(3,), vocab_size=40)
    hidden = torch.randn(2, 4, model.config.hidden_size)
    adapter, vocab = model.draft_head.adapter(3), model.draft_head.vocab_ids
    reference = model.exit_logits(adapter(hidden))  # (2, 4, vocab_size) over every id
    scores = model.draft_exit(3)(hidden)
    torch.testing.assert_close(scores[..., vocab], reference[..., vocab])
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isneginf(scores[..., outside]).all()
    # A layer without an adapter drafts through the plain exit, still over the draft vocabulary.
    torch.testing.assert_close(model.draft_exit(2)(hidden)[..., vocab], model.exit_logits(hidden)[..., vocab])


def test_vocab_prefix_drafts_over_the_most_frequent_ids_only(model):
    with_draft_head(model, exit_layers=(), vocab_size=40)
    hidden = torch.randn(3, model.config.hidden_size)
    full = model.draft_exit(2)(hidden)
    with model.draft_head.vocab_prefix(10):
        prefix = model.draft_exit(2)(hidden)
    kept = model.draft_head.vocab_ids[:10]
    torch.testing.assert_close(prefix[:, kept], full[:, kept])
    assert torch.isfinite(prefix).sum() == 3 * 10
    assert len(model.draft_head.vocab_ids) == 40  # restored on leaving
    with pytest.raises(ValueError, match=r"\[1, 40\].*got 41"):
        with model.draft_head.vocab_prefix(41):
            pass


@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("vocab_size", [None, 40, 1])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_greedy_through_the_draft_head_equals_plain_greedy(rank, vocab_size, threshold):
    model = with_draft_head(tiny_model(seed=3), exit_layers=(1, 2, 4), vocab_size=vocab_size, rank=rank)
    for exit_layer in range(1, NUM_LAYERS):
        for num_speculations in (1, 3, 6):
            assert_same_as_plain(
                model,
                prompt(9, seed=exit_layer),
                exit_layer,
                num_speculations,
                assistant_confidence_threshold=threshold,
                max_new_tokens=17,
            )


def test_the_adapter_changes_the_drafts_not_the_output():
    """Layers after E made identities: the plain exit drafts exactly the full model's tokens. An adapter far from the
    identity then makes drafts wrong, and the output stays plain greedy's."""
    model = tiny_model(seed=5)
    exit_layer = 3
    make_layers_after_the_exit_identities(model, exit_layer)
    input_ids = prompt(8, seed=4)
    settings = dict(
        assistant_early_exit=exit_layer, num_assistant_tokens=4, max_new_tokens=20, return_dict_in_generate=True
    )
    plain = plain_greedy(model, input_ids, max_new_tokens=20)
    assert model.generate(input_ids, do_sample=False, **settings).acceptance_rate == 1.0
    model.set_draft_head({exit_layer: random_adapter(model.config.hidden_size, seed=1)})
    adapted = model.generate(input_ids, do_sample=False, **settings)
    assert torch.equal(adapted.sequences, plain.sequences)
    assert adapted.acceptance_rate < 1.0


def test_each_layer_processes_each_position_once_with_a_draft_head():
    """As without a draft head: layers after E made identities and a vocabulary that holds every token plain greedy
    emits, so that every draft is accepted, and each layer then sees each position once."""
    model = tiny_model(seed=1)
    exit_layer = 2
    make_layers_after_the_exit_identities(model, exit_layer)
    input_ids = prompt(11, seed=18)
    settings = dict(max_new_tokens=23, do_sample=False, return_dict_in_generate=True)
    outputs = {}
    plain_counts = positions_per_layer(
        model.model.layers, lambda: outputs.__setitem__("plain", model.generate(input_ids, **settings))
    )
    emitted = outputs["plain"].sequences[0, input_ids.shape[1] :].unique()
    others = torch.tensor([i for i in range(model.config.vocab_size) if i not in emitted.tolist()])[:20]
    model.set_draft_head({exit_layer: ExitAdapter(model.config.hidden_size)}, torch.cat([others, emitted]))
    ours_counts = positions_per_layer(
        model.model.layers,
        lambda: outputs.__setitem__(
            "ours", model.generate(input_ids, assistant_early_exit=exit_layer, num_assistant_tokens=3, **settings)
        ),
    )
    assert torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
    assert outputs["ours"].acceptance_rate == 1.0
    assert ours_counts == plain_counts


def test_checkpoint_keeps_the_draft_head_and_loads_as_stock_llama(tmp_path):
    model = with_draft_head(tiny_model(seed=2), exit_layers=(2, 4), vocab_size=50, rank=8)
    model.save_pretrained(tmp_path)
    loaded = LayerSkipLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.exit_adapter_layers == [2, 4] and loaded.config.exit_adapter_rank == 8
    assert loaded.config.draft_vocab_size == 50
    for name, tensor in model.draft_head.state_dict().items():
        assert torch.equal(loaded.draft_head.state_dict()[name], tensor), name
    input_ids = prompt(7, seed=2)
    stock = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids).logits, model(input_ids).logits, rtol=0, atol=1e-5)


def test_set_draft_head_refuses_mixed_ranks_and_bad_layers(model):
    adapters = {2: ExitAdapter(model.config.hidden_size), 3: ExitAdapter(model.config.hidden_size, 4)}
    with pytest.raises(ValueError, match="one rank"):
        model.set_draft_head(adapters)
    with pytest.raises(ValueError, match=r"exit_adapter_layers.*got 6"):
        model.set_draft_head({6: ExitAdapter(model.config.hidden_size)})
