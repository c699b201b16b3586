"""Dynamic drafting: the exit chooser against its formula, and decoding with a per-round exit against plain greedy."""

import math

import pytest
import torch
from test_self_speculative import agreeing_model, prompt
from test_self_speculative_batch import PAD, padded_batch

from hf_layerskip.modeling import dynamic_drafting
from hf_layerskip.modeling.draft_head import ExitAdapter
from hf_layerskip.modeling.dynamic_drafting import ExitChooser

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_exit_is_tried_then_the_bound_decides():
    chooser = ExitChooser([8, 4], num_layers=16, exploration=0.3)
    assert [chooser.choose() for _ in range(1)] == [4]
    chooser.record(4, rows=1, drafted=4, accepted=1)
    assert chooser.choose() == 8
    chooser.record(8, rows=1, drafted=3, accepted=3)
    # Speeds: exit 4: (1 + 1) / (1 + 4 * 4/16) = 1.0; exit 8: (1 + 3) / (1 + 3 * 8/16) = 1.6.
    assert chooser.speed(4) == pytest.approx(1.0) and chooser.speed(8) == pytest.approx(1.6)
    bounds = {e: chooser.speed(e) + 0.3 * math.sqrt(math.log(2) / 1) for e in (4, 8)}
    assert chooser.choose() == max(bounds, key=bounds.get) == 8


def test_an_exit_that_stops_paying_loses_to_the_other():
    chooser = ExitChooser([2, 6], num_layers=8)
    for _ in range(50):
        exit_layer = chooser.choose()
        # Exit 2 drafts two and keeps both; exit 6 drafts two and keeps none.
        chooser.record(exit_layer, rows=1, drafted=2, accepted=2 if exit_layer == 2 else 0)
    assert chooser.rounds[2] > 40 > chooser.rounds[6] >= 1


def test_no_candidate_raises():
    with pytest.raises(ValueError, match="at least one"):
        ExitChooser([], num_layers=4)


def model_with_adapters(seed: int):
    model = agreeing_model(seed)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for exit_layer in (1, 3, 4):
        adapter = ExitAdapter(model.config.hidden_size)
        with torch.no_grad():
            adapter.up.normal_(std=0.05, generator=generator)
        adapters[exit_layer] = adapter
    model.set_draft_head(adapters)
    model.config.dynamic_exit = True
    return model


@pytest.mark.parametrize("seed", range(4))
def test_per_round_exits_keep_greedy_output_plain(monkeypatch, seed):
    model = model_with_adapters(seed)
    chosen = []
    record = ExitChooser.record
    monkeypatch.setattr(ExitChooser, "record", lambda self, e, *args: (chosen.append(e), record(self, e, *args)))
    input_ids = prompt(9, seed=seed)
    plain = model.generate(input_ids, do_sample=False, max_new_tokens=40)
    ours = model.generate(input_ids, do_sample=False, max_new_tokens=40, assistant_early_exit=2, num_assistant_tokens=3)
    assert torch.equal(ours, plain)
    assert set(chosen) == {1, 2, 3, 4}  # the requested exit and every adapter's, each tried

    batch = padded_batch([5, 11, 8], seed=seed)
    plain = model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=PAD)
    ours = model.generate(
        **batch, do_sample=False, max_new_tokens=20, pad_token_id=PAD, assistant_early_exit=2, num_assistant_tokens=3
    )
    assert torch.equal(ours, plain)


def test_dynamic_drafting_module_imports_only_the_standard_library():
    source = open(dynamic_drafting.__file__).read()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["math"]
