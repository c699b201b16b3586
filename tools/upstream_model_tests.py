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

With `--family-tests DIR` it runs transformers' own family test files instead: DIR holds files of the public
repository laid out as there (`tests/models/<family>/test_modeling_<family>.py`, `tests/causal_lm_tester.py`, and
whatever else they import that the sdist lacks), fetched by hand into a scratch folder (never into this repository).
Each family file is imported a second time with the stock config, base model and causal LM names of `transformers`
bound to ours (`LlamaConfig` -> `LayerSkipLlamaConfig`, `LlamaModel` -> `LayerSkipLlamaModel`, ...), so that its
model tester and test classes build our classes wherever the stock ones would be built; its test classes keep the
base model and causal LM (the heads LayerSkip does not provide, sequence/token classification and question
answering, are dropped from `all_model_classes` and the pipeline mapping; test classes with none of ours left, the
multimodal and the @slow integration ones, are not collected). `--stock` runs the same files, filtered the same way,
on the stock classes, for comparison. One pytest per family and variant, each under `--timeout` seconds; a table of
passed/failed/skipped per family comes at the end, with the failed tests.

    python tools/upstream_model_tests.py --sdist transformers-X.tar.gz --family-tests DIR [--stock] [--timeout 300] \\
        [--families llama,qwen2,...] [-- PYTEST_ARGS]

`test_pipeline_mixin.py` is replaced by a stub there (it imports transformers from a source checkout), so the
pipeline tests do not run. Names a fetched file imports from `transformers.testing_utils` that the installed
release no longer has (`require_torch_sdpa`, `require_read_token`) are supplied as no-op decorators.
On our classes layer dropout is off by default, as in the stock models' training (`UPSTREAM_LAYER_DROPOUT=1` keeps
LayerSkip's default 0.1), and `test_can_init_all_missing_weights`, which the common tests skip for models whose config
file has no copyright year from 2023 on, runs.

It needs `parameterized` (which transformers' tests import) besides the `[test]` extra.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import transformers

STUBS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": "config_common_kwargs = {}\n",
    # Read by `test_pipeline_mixin.py` (which the family files import) when imported; the family files skip the
    # pipeline tests (`is_pipeline_test_to_skip`), so an empty summary will do.
    "utils/tiny_model_summary.json": "{}\n",
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


# Imports a family test file again with our classes bound to the stock names (see the module docstring).
FAMILY_LOADER = textwrap.dedent(
    '''
    """Loads transformers' family test files for our classes or the stock ones.

    Written by hf_layerskip's tools/upstream_model_tests.py.
    """

    import functools
    import importlib.util
    import inspect
    import os
    import sys
    import types
    import unittest

    import transformers
    import transformers.testing_utils as testing_utils
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    from hf_layerskip import FAMILIES

    # Decorators the fetched files import that the installed release dropped: no-ops (torch 2.x always has sdpa).
    for _name in ("require_torch_sdpa", "require_read_token"):
        if not hasattr(testing_utils, _name):
            setattr(testing_utils, _name, lambda test: test)

    # family directory upstream -> (our FAMILIES key, stock config, base model and causal LM names)
    STOCK_NAMES = {
        "llama": ("llama", "LlamaConfig", "LlamaModel", "LlamaForCausalLM"),
        "qwen2": ("qwen2", "Qwen2Config", "Qwen2Model", "Qwen2ForCausalLM"),
        "qwen3": ("qwen3", "Qwen3Config", "Qwen3Model", "Qwen3ForCausalLM"),
        "mistral": ("mistral", "MistralConfig", "MistralModel", "MistralForCausalLM"),
        "gemma3": ("gemma3_text", "Gemma3TextConfig", "Gemma3TextModel", "Gemma3ForCausalLM"),
        "phi3": ("phi3", "Phi3Config", "Phi3Model", "Phi3ForCausalLM"),
    }


    class _Bound(types.ModuleType):
        """`transformers`, but for the names given (transformers' lazy module ignores attributes set on it)."""

        def __init__(self, real, names):
            super().__init__(real.__name__)
            self.__dict__.update(_real=real, _names=names, __path__=real.__path__)

        def __getattr__(self, name):
            if name in self.__dict__["_names"]:
                return self.__dict__["_names"][name]
            return getattr(self.__dict__["_real"], name)


    def _no_layer_dropout(config_class):
        """Layer dropout off by default, the stock models' training behaviour (see the README)."""
        init = config_class.__init__

        @functools.wraps(init)  # keeps the signature, from which the model tester takes the config's arguments
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("layer_dropout_max", 0.0)
            init(self, *args, **kwargs)

        config_class.__init__ = __init__


    def load(directory, variant):
        """The family file's test classes, on our classes (variant "ours") or the stock ones ("stock")."""
        key, *names = STOCK_NAMES[directory]
        stock = tuple(getattr(transformers, name) for name in names)
        ours = FAMILIES[key]
        classes = stock if variant == "stock" else ours
        if variant == "ours":
            # The common tests tell base models and causal LMs apart by the names in these tables.
            MODEL_MAPPING_NAMES[ours[0].model_type] = ours[1].__name__
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[ours[0].model_type] = ours[2].__name__
            if os.environ.get("UPSTREAM_LAYER_DROPOUT") != "1":
                _no_layer_dropout(ours[0])
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "..", directory, f"test_modeling_{directory}.py")
        name = f"tests.models.{directory}.test_modeling_{directory}_{variant}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        # `from transformers import X` while the file runs finds this module: the real one, with our names bound.
        bound = _Bound(transformers, dict(zip(names, classes)))
        try:
            sys.modules["transformers"] = bound
            spec.loader.exec_module(module)
        finally:
            sys.modules["transformers"] = transformers
        kept = {}
        for name, value in vars(module).items():
            if not (isinstance(value, type) and issubclass(value, unittest.TestCase)):
                continue
            if value.__module__ != module.__name__:
                continue
            model_classes = tuple(c for c in (getattr(value, "all_model_classes", None) or ()) if c in classes)
            if not model_classes:
                continue  # multimodal, integration (@slow) and other test classes without our classes
            value.all_model_classes = model_classes
            if variant == "ours":
                # `test_can_init_all_missing_weights` dates a model by the "# Copyright YYYY" line of its config's
                # source file and skips those before 2023; ours has no such line: run it, as for the stock classes.
                value.test_can_init_all_missing_weights_before_2023 = True
            if isinstance(inspect.getattr_static(value, "all_generative_model_classes", None), (tuple, list)):
                generative = value.all_generative_model_classes
                value.all_generative_model_classes = tuple(c for c in generative if c in classes)
            if getattr(value, "pipeline_model_mapping", None):
                value.pipeline_model_mapping = {
                    task: c for task, c in value.pipeline_model_mapping.items() if c in classes
                }
            kept[name] = value
        return kept
    '''
)


def prepare_family_tests(root: Path, family_tests: Path, families: list[str], variants: list[str]) -> list[Path]:
    """Copies the fetched files over the sdist's tests and writes one test module per family and variant."""
    source = family_tests / "tests" if (family_tests / "tests").is_dir() else family_tests
    for path in source.rglob("*.py"):
        target = root / "tests" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    package = root / "tests" / "models" / "layerskip_upstream"
    package.mkdir(parents=True, exist_ok=True)
    (package / "_loader.py").write_text(FAMILY_LOADER)
    modules = []
    for family in families:
        if not (root / "tests" / "models" / family / f"test_modeling_{family}.py").exists():
            print(f"{family}: no tests/models/{family}/test_modeling_{family}.py in {family_tests}", flush=True)
            continue
        for variant in variants:
            module = package / f"test_upstream_{family}_{variant}.py"
            module.write_text(f"from ._loader import load\n\nglobals().update(load({family!r}, {variant!r}))\n")
            modules.append(module)
    return modules


def counts(junit: Path) -> tuple[dict, list[str]]:
    """passed/failed/skipped by junit test case (errors count as failed) and the failed tests of a junit file."""
    result, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
    if not junit.exists():
        return result, failed
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome in ("failure", "error"):
            result["failed"] += 1
            message = next(child for child in case if child.tag in ("failure", "error")).get("message", "")
            failed.append(f"{case.get('name')}: {message.splitlines()[0][:200] if message else ''}")
        elif outcome == "skipped":
            result["skipped"] += 1
        else:
            result["passed"] += 1
    return result, failed


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
    parser.add_argument("--family-tests", type=Path, help="a folder of transformers' family test files (see above)")
    parser.add_argument("--stock", action="store_true", help="with --family-tests: run them on the stock classes too")
    parser.add_argument("--timeout", type=int, default=300, help="with --family-tests: seconds per family and variant")
    parser.add_argument("--families", default="llama,qwen2,qwen3,mistral,gemma3,phi3", help="with --family-tests")
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
    if args.family_tests:
        root = next(workdir.glob("transformers-*"), None)
        if root is None:
            with tarfile.open(sdist) as archive:
                members = [member for member in archive.getmembers() if "/tests/" in member.name]
                archive.extractall(workdir, members=members, filter="data")
            root = next(workdir.glob("transformers-*"))
        variants = ["ours", "stock"] if args.stock else ["ours"]
        modules = prepare_family_tests(root, args.family_tests, args.families.split(","), variants)
        prepare(sdist, workdir)  # stubs for what neither the sdist nor the folder holds, and the __init__ files
        # `test_pipeline_mixin.py` imports transformers from a source checkout (`src/transformers`), which the sdist's
        # tests do not sit beside: stubbed, so the pipeline tests (which these family files skip) are not run.
        (root / "tests" / "test_pipeline_mixin.py").write_text("class PipelineTesterMixin:\n    pass\n")
        print(f"transformers {transformers.__version__}, tests from {sdist.name} and {args.family_tests}", flush=True)
        rows, status = [], 0
        for module in modules:
            junit = module.with_suffix(".xml")
            junit.unlink(missing_ok=True)
            relative = module.relative_to(root)
            command = [sys.executable, "-m", "pytest", str(relative), "-p", "no:cacheprovider", f"--junitxml={junit}"]
            try:
                run = subprocess.run(
                    [*command, *args.pytest_args], cwd=root, timeout=args.timeout, capture_output=True, text=True
                )
                sys.stdout.write(run.stdout + run.stderr)
                code, note, output = run.returncode, "", run.stdout
            except subprocess.TimeoutExpired as expired:
                code, note, output = 1, f"timed out after {args.timeout} s", ""
                sys.stdout.write(str(expired.stdout or ""))
            status = status or code
            _, failed = counts(junit)
            # pytest's own summary line (the junit file also lists subtests, and not all tests once each).
            summary = output.strip().splitlines()[-1] if output.strip() else ""
            result = {key: 0 for key in ("passed", "failed", "skipped")}
            for number, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary):
                result["failed" if outcome.startswith("error") else outcome] += int(number)
            note = note or ("" if junit.exists() else "no result")
            rows.append((module.stem.removeprefix("test_upstream_"), result, note, failed))
        print("\nfamily_variant            passed  failed  skipped")
        for name, result, note, _ in rows:
            print(f"{name:24s} {result['passed']:7d} {result['failed']:7d} {result['skipped']:8d}  {note}")
        for name, _, _, failed in rows:
            for line in failed:
                print(f"FAILED {name}: {line}")
        return status
    root = prepare(sdist, workdir)
    print(f"transformers {transformers.__version__}, tests from {sdist.name}, in {root}", flush=True)
    pytest = [sys.executable, "-m", "pytest", "tests/models/layerskip", "-p", "no:cacheprovider", *args.pytest_args]
    return subprocess.run(pytest, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())
