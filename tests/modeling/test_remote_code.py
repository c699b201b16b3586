"""A saved checkpoint loads with `trust_remote_code=True` where `hf_layerskip` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ALL_FAMILIES, scale_residual_branches, tiny_model

from hf_layerskip import FAMILIES

EXIT_LAYER = 3
NUM_SPECULATIONS = 3
MAX_NEW_TOKENS = 16

# Runs in a fresh interpreter, outside the repository, with every import of `hf_layerskip` failing.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_layerskip"] = None
    import json
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    checkpoint, prompt = sys.argv[1], json.loads(sys.argv[2])
    exit_layer, num_speculations, max_new_tokens = map(int, sys.argv[3:6])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    input_ids = torch.tensor(prompt)

    def greedy(**kwargs):
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)[0].tolist()

    results = {
        "class_name": type(model).__name__,
        "module": type(model).__module__,
        "greedy": greedy(),
        "self_speculative": greedy(assistant_early_exit=exit_layer, num_assistant_tokens=num_speculations),
        "stats": [model.speculation_stats.drafted_tokens, model.speculation_stats.accepted_tokens],
        "early_exit": greedy(early_exit=exit_layer),
        "early_exit_logits": model(input_ids, exit_layer=exit_layer).logits.tolist(),
        "base_class_name": type(base).__name__,
        "base_module": type(base).__module__,
        "base_hidden": base(input_ids).last_hidden_state.tolist(),
    }
    print(json.dumps(results))
    """
)


def model_with_quiet_late_layers(family: str):
    """A tiny model whose layers after the exit barely change the residual stream.

    Early-exit drafts then mostly, but not always, agree with the full model, so that verification both accepts
    and rejects.
    """
    model = tiny_model(seed=3, family=family)
    scale_residual_branches(model.model.layers[EXIT_LAYER:], 0.4)
    return model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_checkpoint_runs_as_remote_code_without_hf_layerskip(tmp_path, family):
    model = model_with_quiet_late_layers(family)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    prompt = [[5, 17, 99, 3, 42, 8, 61, 30]]  # longer than the sliding windows (4)
    arguments = [str(checkpoint), json.dumps(prompt), str(EXIT_LAYER), str(NUM_SPECULATIONS), str(MAX_NEW_TOKENS)]
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    remote = json.loads(completed.stdout.strip().splitlines()[-1])

    _, base_class, causal_lm_class = FAMILIES[family]
    assert remote["class_name"] == causal_lm_class.__name__
    assert remote["module"].startswith("transformers_modules.")

    input_ids = torch.tensor(prompt)
    expected = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist()
    assert remote["greedy"] == expected
    assert remote["self_speculative"] == expected
    drafted, accepted = remote["stats"]
    assert 0 < accepted < drafted, "the test model should make verification both accept and reject drafts"
    expected_early = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, early_exit=EXIT_LAYER)
    assert remote["early_exit"] == expected_early[0].tolist()
    assert remote["early_exit"] != expected, "early exit should be lossy on this model"
    torch.testing.assert_close(torch.tensor(remote["early_exit_logits"]), model(input_ids, exit_layer=EXIT_LAYER).logits)
    # The causal LM's checkpoint also loads as the base model.
    assert remote["base_class_name"] == base_class.__name__
    assert remote["base_module"].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(remote["base_hidden"]), model.model(input_ids).last_hidden_state)
