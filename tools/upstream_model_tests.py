"""Runs transformers' own common model tests against every LayerSkip family's base model and causal LM.

transformers' `ModelTesterMixin` (`tests/test_modeling_common.py`) is what every stock model's test suite runs: saving
and loading, initialisation, hidden-state and attention outputs, training and gradient checkpointing, attention
implementations, resizing embeddings, and so on. This script takes it from the transformers sdist of the installed
release (downloaded with `pip download` unless `--sdist` names one), and runs it against `LayerSkipXModel` and
`LayerSkipXForCausalLM` of each family, with a small model tester of its own (the family test files and
`causal_lm_tester.py` are not in the sdist). Nothing from transformers is copied into this repository: the tests are
unpacked into a scratch folder outside it.

The sdist lacks three modules `test_modeling_common.py` imports; they are stubbed, and what they hold is not run:
`generation/test_utils.py` (`GenerationTesterMixin`, the generation tests: this package's own tests compare
generation with the stock classes instead), `exporters/test_export.py` (`ExportTesterMixin`, torch.export) and
`utils/test_configuration_utils.py` (the config tester's common kwargs).

    python tools/upstream_model_tests.py [--sdist transformers-X.tar.gz] [--workdir /tmp/upstream-tests] [-- PYTEST_ARGS]

It needs `parameterized` (which transformers' tests import) besides the `[test]` extra.
"""

import argparse
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import transformers

STUBS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
}

# The model tester and one test class per family, written into the scratch tests as `tests/models/layerskip/...`.
LAYERSKIP_TESTS = textwrap.dedent(
    '''
    """transformers' ModelTesterMixin on every LayerSkip family (written by hf_layerskip's tools/upstream_model_tests.py)."""

    import unittest

    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    from hf_layerskip import FAMILIES

    from ...test_modeling_common import ModelTesterMixin, ids_tensor

    # The common tests tell base models and causal LMs apart by the class names in these tables, which
    # `AutoModel.register` (what `import hf_layerskip` does) leaves alone: list ours as the stock ones are listed.
    for _config, _base, _causal_lm in FAMILIES.values():
        MODEL_MAPPING_NAMES[_config.model_type] = _base.__name__
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[_config.model_type] = _causal_lm.__name__

    # Small enough that the family's feature matters in 7-token inputs: sliding windows of 4, Gemma 3's two layer types.
    FAMILY_SETTINGS = {
        "llama": {},
        "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, head_dim=8),
        "mistral": dict(sliding_window=4),
        "gemma3_text": dict(
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            head_dim=8,
            query_pre_attn_scalar=8,
            final_logit_softcapping=2.0,
        ),
        "phi3": dict(sliding_window=4),
    }


    class LayerSkipModelTester:
        def __init__(self, parent, family, batch_size=13, seq_length=7):
            self.parent, self.family = parent, family
            self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, True
            # Two layers, as the common tests require (`test_num_layers_is_small`); LayerSkip's minimum too.
            self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 99, 32, 2, 4

        def get_config(self):
            return FAMILIES[self.family][0](
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                num_key_value_heads=2,
                intermediate_size=37,
                max_position_embeddings=512,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                # Layer dropout off, the stock models' training behaviour: with it on (LayerSkip's default 0.1), a
                # training forward is stochastic and refuses `output_hidden_states` (it would record partial
                # batches), which the common training tests ask for.
                layer_dropout_max=0.0,
                **FAMILY_SETTINGS[self.family],
            )

        def prepare_config_and_inputs_for_common(self):
            input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            attention_mask = torch.tril(torch.ones_like(input_ids))
            return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


    def family_test(family):
        _, base_model_class, causal_lm_class = FAMILIES[family]

        class Test(ModelTesterMixin, unittest.TestCase):
            all_model_classes = (base_model_class, causal_lm_class)

            def setUp(self):
                self.model_tester = LayerSkipModelTester(self, family)

            def test_generation_tester_mixin_inheritance(self):
                self.skipTest(
                    "the sdist has no GenerationTesterMixin (stubbed): transformers' generation tests do not run here; "
                    "hf_layerskip's own tests compare generate with the stock classes'"
                )

        Test.__name__ = Test.__qualname__ = causal_lm_class.__name__.replace("ForCausalLM", "ModelTest")
        return Test


    for _family in FAMILIES:
        _test = family_test(_family)
        globals()[_test.__name__] = _test
    del _family, _test
    '''
)


def prepare(sdist: Path, workdir: Path) -> Path:
    """Unpacks the sdist's `tests/` into `workdir`, adds the stubs and the LayerSkip tests; returns the root."""
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if "/tests/" in member.name]
        archive.extractall(workdir, members=members, filter="data")
    root = next(workdir.glob("transformers-*"))
    tests = root / "tests"
    for relative, text in {**STUBS, "models/layerskip/test_modeling_layerskip.py": LAYERSKIP_TESTS}.items():
        path = tests / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(text)
    for directory in [tests, *(path for path in tests.rglob("*") if path.is_dir())]:
        (directory / "__init__.py").touch()
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="a transformers sdist; default: downloaded for the installed release")
    parser.add_argument("--workdir", type=Path, help="scratch folder; default: a new temporary one")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="upstream-tests-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sdist = args.sdist
    if sdist is None:
        version = transformers.__version__
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*command, f"transformers=={version}", "-d", str(workdir)], check=True)
        sdist = workdir / f"transformers-{version}.tar.gz"
    root = prepare(sdist, workdir)
    print(f"transformers {transformers.__version__}, tests from {sdist.name}, in {root}", flush=True)
    pytest = [sys.executable, "-m", "pytest", "tests/models/layerskip", "-p", "no:cacheprovider", *args.pytest_args]
    return subprocess.run(pytest, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
