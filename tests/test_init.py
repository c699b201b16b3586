"""`hf_layerskip/__init__.py`: the trainer pair at the top level, imported only when first asked for."""

import subprocess
import sys

import pytest

PROGRAM = """
import sys
import hf_layerskip
assert "hf_layerskip.trainer" not in sys.modules and "transformers.trainer" not in sys.modules, "imported eagerly"
from hf_layerskip import LayerSkipTrainer, LayerSkipTrainingArguments
import hf_layerskip.trainer as trainer
assert LayerSkipTrainer is trainer.LayerSkipTrainer and LayerSkipTrainingArguments is trainer.LayerSkipTrainingArguments
assert {"LayerSkipTrainer", "LayerSkipTrainingArguments"} <= set(hf_layerskip.__all__) & set(dir(hf_layerskip))
"""


def test_trainer_exports_load_lazily():
    # A fresh interpreter: this one has long imported the trainer.
    subprocess.run([sys.executable, "-c", PROGRAM], check=True)


def test_an_unknown_name_is_an_attribute_error():
    import hf_layerskip

    with pytest.raises(AttributeError, match="has no attribute 'LayerSkipTrainerz'"):
        hf_layerskip.LayerSkipTrainerz
