"""Self-speculative sampling is exact: with temperature, top-k and top-p applied to both the draft and the full
model, the first two generated tokens follow the full model's distribution. Thousands of seeded `generate` calls on
a tiny model (vocabulary 8, 2 layers, drafting from layer 1) are compared with the exact joint distribution of the
first two tokens, computed from the model's own processed probabilities, by a chi-square test. The same test rejects
two wrong acceptance rules."""

import pytest
import torch
from conftest import tiny_model

from hf_layerskip.modeling import self_speculative

VOCAB_SIZE = 8
SAMPLING = dict(do_sample=True, temperature=2.0, top_k=6, top_p=0.95)
PROMPT = torch.tensor([[1, 2, 3]])
NUM_SAMPLES = 3000
NUM_SAMPLES_WRONG_RULE = 1000  # a wrong rule is far off; fewer samples suffice to reject it
MIN_EXPECTED = 5  # cells expected fewer times are pooled, as chi-square asks


@pytest.fixture(scope="module")
def model():
    # Weights larger than usual, so that the exit at layer 1 drafts from a distribution far from the full model's.
    return tiny_model(seed=0, vocab_size=VOCAB_SIZE, num_hidden_layers=2, initializer_range=0.3)


pytestmark = pytest.mark.usefixtures("one_thread")


def processed_probs(model, input_ids, **settings) -> torch.Tensor:
    """The next-token distribution `(vocab_size,)` after the logits processors, exactly as `generate` applies them."""
    output = model.generate(
        input_ids, max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **SAMPLING, **settings
    )
    return output.scores[0][0].double().softmax(dim=-1)


def exact_joint(model, prompt=PROMPT, **settings) -> torch.Tensor:
    """P(first token = a, second = b) after `prompt` `(1, length)`, `(vocab_size, vocab_size)`; `early_exit=E` gives
    the draft's."""
    first = processed_probs(model, prompt, **settings)
    rows = [
        first[a] * processed_probs(model, torch.cat([prompt, torch.tensor([[a]])], dim=1), **settings)
        for a in range(VOCAB_SIZE)
    ]
    return torch.stack(rows)


def sample_first_two(model, num_samples: int, prompt=PROMPT, **settings) -> torch.Tensor:
    """Counts `(vocab_size, vocab_size)` of the first two tokens of `num_samples` self-speculative samples."""
    torch.manual_seed(0)
    counts = torch.zeros(VOCAB_SIZE, VOCAB_SIZE)
    for _ in range(num_samples):
        # Three new tokens, so that the first round drafts two and both go through the acceptance rule.
        sequence = model.generate(
            prompt, max_new_tokens=3, assistant_early_exit=1, num_assistant_tokens=2, **SAMPLING, **settings
        )
        first, second = sequence[0, prompt.shape[1] : prompt.shape[1] + 2].tolist()
        counts[first, second] += 1
    return counts


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of `counts` to `probs`; cells expected fewer than `MIN_EXPECTED` times are pooled.

    A sample in a cell of probability 0 gives p-value 0.
    """
    counts, probs = counts.flatten().double(), probs.flatten()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * counts.sum()
    large, small = expected >= MIN_EXPECTED, (expected < MIN_EXPECTED) & (probs > 0)
    observed = torch.cat([counts[large], counts[small].sum()[None]])
    expected = torch.cat([expected[large], expected[small].sum()[None]])
    if not small.any():
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees_of_freedom = len(observed) - 1
    # Survival function of chi-square: the regularized upper incomplete gamma function.
    return float(torch.special.gammaincc(torch.tensor(degrees_of_freedom / 2.0, dtype=torch.float64), statistic / 2))


def keep_with_probability_p(draft_tokens, draft_probs, target_probs):
    """Wrong rule: keeps draft token i with probability p_i instead of min(1, p_i / q_i)."""
    num_drafted = len(draft_tokens)
    p = target_probs[torch.arange(num_drafted), draft_tokens]
    rejections = (~(torch.rand(num_drafted) < p)).nonzero()
    num_accepted = int(rejections[0]) if len(rejections) else num_drafted
    if num_accepted < num_drafted:
        next_probs = self_speculative.residual_distribution(target_probs[num_accepted], draft_probs[num_accepted])
    else:
        next_probs = target_probs[num_drafted]
    return num_accepted, torch.cat([draft_tokens[:num_accepted], torch.multinomial(next_probs, 1)])


def test_the_draft_is_far_from_the_full_model(model):
    """Otherwise nearly every draft would be accepted and a wrong rule could pass unnoticed."""
    draft, target = exact_joint(model, early_exit=1), exact_joint(model)
    assert float((draft - target).abs().sum() / 2) > 0.3


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_first_two_tokens_follow_the_full_model(model, cache_implementation):
    samples = sample_first_two(model, NUM_SAMPLES, cache_implementation=cache_implementation)
    p_value = chi_square_p_value(samples, exact_joint(model))
    assert p_value > 1e-3, p_value


def test_a_draft_over_a_draft_vocabulary_and_an_adapter_keeps_sampling_exact(model):
    """The draft's distribution is then supported on 5 of the 8 ids, and shaped by the adapter: the full model's
    tokens outside it can only come from the rejection's residual or the last token."""
    from hf_layerskip.modeling.draft_head import ExitAdapter

    drafting = tiny_model(seed=0, vocab_size=VOCAB_SIZE, num_hidden_layers=2, initializer_range=0.3)
    adapter = ExitAdapter(drafting.config.hidden_size)
    with torch.no_grad():
        adapter.up.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    drafting.set_draft_head({1: adapter}, torch.tensor([6, 2, 0, 5, 3]))
    p_value = chi_square_p_value(sample_first_two(drafting, NUM_SAMPLES), exact_joint(model))
    assert p_value > 1e-3, p_value


def test_lookup_drafts_keep_sampling_exact(model):
    """The prompt ends as it began (1, 2): lookup drafts what followed (3, 1) in every first round, a proposal with
    all its mass on one token, which the rule keeps with probability p."""
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    counts = sample_first_two(model, NUM_SAMPLES, prompt, prompt_lookup_num_tokens=2)
    assert model.speculation_stats.lookup_rounds > 0
    p_value = chi_square_p_value(counts, exact_joint(model, prompt))
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_each_row_of_a_batch_follows_the_full_model(model, cache_implementation):
    """Rows of a batch accept different numbers of drafts per round; each row's first two tokens still follow the
    full model's distribution after its own prompt. The second row's shorter prompt is left-padded."""
    short = torch.tensor([[5, 3]])
    input_ids = torch.tensor([[1, 2, 3], [0, 5, 3]])
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    torch.manual_seed(0)
    counts = torch.zeros(2, VOCAB_SIZE, VOCAB_SIZE)
    for _ in range(NUM_SAMPLES):
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=3,
            assistant_early_exit=1,
            num_assistant_tokens=2,
            pad_token_id=0,
            cache_implementation=cache_implementation,
            **SAMPLING,
        )
        for row in range(2):
            counts[row, sequences[row, 3], sequences[row, 4]] += 1
    for row, prompt in enumerate([PROMPT, short]):
        p_value = chi_square_p_value(counts[row], exact_joint(model, prompt))
        assert p_value > 1e-3, (row, p_value)


def test_plain_sampling_passes_the_same_test(model):
    """The exact distribution and the statistic are right: plain sampling fits them too."""
    torch.manual_seed(0)
    counts = torch.zeros(VOCAB_SIZE, VOCAB_SIZE)
    for _ in range(NUM_SAMPLES_WRONG_RULE):
        sequence = model.generate(PROMPT, max_new_tokens=2, **SAMPLING)
        counts[sequence[0, -2], sequence[0, -1]] += 1
    assert chi_square_p_value(counts, exact_joint(model)) > 1e-3


@pytest.mark.parametrize(
    "name, wrong_rule",
    [
        # The replacement of a rejected token drawn from p instead of norm(max(p - q, 0)).
        ("residual_distribution", lambda target_probs, draft_probs: target_probs),
        ("accept_speculative_sampling", keep_with_probability_p),
    ],
)
def test_a_wrong_acceptance_rule_is_rejected(model, monkeypatch, name, wrong_rule):
    monkeypatch.setattr(self_speculative, name, wrong_rule)
    p_value = chi_square_p_value(sample_first_two(model, NUM_SAMPLES_WRONG_RULE), exact_joint(model))
    assert p_value < 1e-6, p_value


def test_a_wrong_residual_is_rejected_with_lookup_drafts(model, monkeypatch):
    """With lookup's one-hot proposal the residual is p without the proposed token: drawing from p instead shows."""
    monkeypatch.setattr(self_speculative, "residual_distribution", lambda target_probs, draft_probs: target_probs)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    counts = sample_first_two(model, NUM_SAMPLES_WRONG_RULE, prompt, prompt_lookup_num_tokens=2)
    p_value = chi_square_p_value(counts, exact_joint(model, prompt))
    assert p_value < 1e-6, p_value
