"""The decoder's host synchronisations per round, counted: every call the decoder's own code makes that reads a
tensor's value on the host (`tolist`, `item`, `bool`, `int`, `float`, `nonzero`, `cpu`, indexing by a boolean mask),
between the starts of consecutive rounds. The README states these counts; transformers' own code (its eager mask
building, which compiled steps trace away) is not counted."""

import collections
import inspect

import pytest
import torch
from test_self_speculative import agreeing_model, prompt
from test_self_speculative_batch import PAD, padded_batch
from torch.overrides import TorchFunctionMode

from hf_layerskip.modeling import self_speculative

SYNCHRONISING = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.cpu,
}
DECODER_FILE = inspect.getsourcefile(self_speculative)

pytestmark = pytest.mark.usefixtures("one_thread")


class CountSynchronisations(TorchFunctionMode):
    """Counts the synchronising tensor calls made directly by the decoder's module."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        synchronises = func in SYNCHRONISING
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            synchronises = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        caller = inspect.currentframe().f_back
        if synchronises and caller.f_code.co_filename == DECODER_FILE:
            self.count += 1
            self.sites[f"{caller.f_code.co_name}:{caller.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


def rounds_of(model, monkeypatch, **generate_kwargs) -> list[tuple[int, int]]:
    """`(synchronisations, draft steps)` of every round but the last (which also ends the call)."""
    counter, starts, steps = CountSynchronisations(), [], []
    draft = self_speculative.SelfSpeculativeDecoder.draft

    def counted_draft(decoder):
        starts.append(counter.count)
        result = draft(decoder)
        steps.append(decoder.exit_query_cache.shape[1])
        return result

    monkeypatch.setattr(self_speculative.SelfSpeculativeDecoder, "draft", counted_draft)
    with counter:
        model.generate(**generate_kwargs)
    assert len(starts) > 3, "several rounds"
    return [(end - start, step) for start, end, step in zip(starts, starts[1:], steps)]


@pytest.fixture(scope="module")
def agreeing():
    return agreeing_model()


SPECULATIVE = dict(assistant_early_exit=2, num_assistant_tokens=4, max_new_tokens=30, pad_token_id=PAD)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_synchronises_once_per_round(agreeing, monkeypatch, batch_size, cache_implementation):
    inputs = dict(input_ids=prompt(9, seed=3)) if batch_size == 1 else padded_batch([9, 4, 7], seed=3)
    rounds = rounds_of(agreeing, monkeypatch, **inputs, **SPECULATIVE, cache_implementation=cache_implementation)
    assert [syncs for syncs, _ in rounds] == [1] * len(rounds)


def test_an_eos_token_adds_one_per_draft_step(agreeing, monkeypatch):
    """`draft` stops drafting once every row has drafted eos: it reads that after each draft step."""
    rounds = rounds_of(agreeing, monkeypatch, **padded_batch([9, 4, 7], seed=3), **SPECULATIVE, eos_token_id=127)
    assert [syncs for syncs, _ in rounds] == [1 + steps for _, steps in rounds]


def test_sampling_adds_one_per_row(agreeing, monkeypatch):
    """Speculative sampling's draw decides how many tokens a row gets before its tokens are written."""
    torch.manual_seed(0)
    rounds = rounds_of(agreeing, monkeypatch, **padded_batch([9, 4, 7], seed=3), **SPECULATIVE, do_sample=True)
    # Rows leave as they reach max_length; every round counted here has all three.
    assert [syncs for syncs, _ in rounds][:3] == [1 + 3] * 3
