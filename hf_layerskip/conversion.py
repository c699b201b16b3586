"""Turn a Hugging Face Llama directory or a Llama-architecture GGUF file into a LayerSkip checkpoint."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .modeling import LayerSkipLlamaConfig, LayerSkipLlamaForCausalLM

LLAMA_MODEL_TYPES = ("llama", LayerSkipLlamaConfig.model_type)
# Keys of a source config that describe how it was stored, not the architecture.
_SOURCE_ONLY_CONFIG_KEYS = ("model_type", "architectures", "quantization_config", "auto_map", "_name_or_path", "dtype")


def split_source(source: str | Path) -> tuple[Path, str | None]:
    """`(directory, gguf_file)` for a model directory or a `.gguf` file path."""
    source = Path(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        return source.parent, source.name
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is neither a .gguf file nor a model directory with a config.json")
    return source, None


def load_as_layerskip(source: str | Path, dtype: torch.dtype = torch.float32, **layerskip_settings):
    """Loads a Llama checkpoint (directory or GGUF) as a `LayerSkipLlamaForCausalLM` with plain, unquantized weights.

    A model loaded from GGUF is marked quantized and refuses `save_pretrained`, so its dequantized weights are
    moved into a fresh model. `layerskip_settings` are `LayerSkipLlamaConfig` fields (`exit_layer=8`, ...).
    Returns `(model, tokenizer)`.
    """
    directory, gguf_file = split_source(source)
    source_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    model_type = source_model.config.model_type
    if model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(f"Only Llama-architecture models convert, got model_type={model_type!r} from {source}.")
    settings = {k: v for k, v in source_model.config.to_dict().items() if k not in _SOURCE_ONLY_CONFIG_KEYS}
    settings.update({k: v for k, v in layerskip_settings.items() if v is not None})
    config = LayerSkipLlamaConfig(**settings)
    with torch.device("meta"):
        model = LayerSkipLlamaForCausalLM(config)
    model.load_state_dict(source_model.state_dict(), strict=False, assign=True)
    model.tie_weights()
    model.to(dtype).eval()
    model.generation_config = GenerationConfig.from_dict(
        {**source_model.generation_config.to_diff_dict(), **_speculation_defaults(config), "_from_model_config": False}
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    return model, tokenizer


def _speculation_defaults(config: LayerSkipLlamaConfig) -> dict:
    return {"num_assistant_tokens": config.num_speculations, "assistant_confidence_threshold": 0.0}


def convert(source: str | Path, output_dir: str | Path, dtype: torch.dtype = torch.float32, **layerskip_settings) -> Path:
    """Converts `source` (Llama directory or GGUF file) into a LayerSkip checkpoint at `output_dir`.

    The checkpoint holds safetensors weights, the config, the tokenizer, the generation config and the model's
    code, so it loads with `trust_remote_code=True` where `hf_layerskip` is not installed.
    """
    model, tokenizer = load_as_layerskip(source, dtype=dtype, **layerskip_settings)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
