"""Turn a Hugging Face checkpoint directory (Llama, Qwen2, Qwen3, Mistral, Gemma 3 text, Phi-3) or a GGUF file of one
into a LayerSkip checkpoint of the same family."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .modeling import FAMILIES
from .modeling.configuration_layerskip import DRAFT_HEAD_FIELDS, LAYERSKIP_FIELDS

# The model types that convert, stock or already LayerSkip, each to its family's LayerSkip config and causal LM.
CONVERTIBLE_MODEL_TYPES = {
    **{model_type: (config, causal_lm) for model_type, (config, _, causal_lm) in FAMILIES.items()},
    **{config.model_type: (config, causal_lm) for config, _, causal_lm in FAMILIES.values()},
}
# Keys of a source config that describe how or where it was stored, not the architecture. Keys starting with "_"
# (`_name_or_path`, GGUF's `_model_name_or_path`) are dropped too.
_SOURCE_ONLY_CONFIG_KEYS = ("model_type", "architectures", "quantization_config", "auto_map", "dtype", "transformers_version")


def split_source(source: str | Path) -> tuple[Path, str | None]:
    """`(directory, gguf_file)` for a model directory or a `.gguf` file path."""
    source = Path(source)
    if source.suffix == ".gguf":
        if not source.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
        if importlib.util.find_spec("gguf") is None:  # transformers' own error would not name our extra
            raise ModuleNotFoundError("Reading a .gguf file needs gguf: pip install 'hf_layerskip[gguf]'", name="gguf")
        return source.parent, source.name
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is neither a .gguf file nor a model directory with a config.json")
    return source, None


def layerskip_classes(model_type: str, source) -> tuple[type, type]:
    """The LayerSkip config and causal-LM classes for a source's `model_type`."""
    if model_type not in CONVERTIBLE_MODEL_TYPES:
        raise ValueError(
            f"No LayerSkip family for model_type={model_type!r} from {source} "
            f"(allowed: {', '.join(CONVERTIBLE_MODEL_TYPES)})."
        )
    return CONVERTIBLE_MODEL_TYPES[model_type]


def _check_settings(layerskip_settings: dict) -> None:
    allowed = [name for name in LAYERSKIP_FIELDS if name not in DRAFT_HEAD_FIELDS]
    unknown = sorted(set(layerskip_settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown LayerSkip settings {unknown}; allowed: {', '.join(allowed)} (the draft head's "
            f"{', '.join(DRAFT_HEAD_FIELDS)} come with its weights: `hf-layerskip train-draft` sets them)."
        )


def load_as_layerskip(
    source: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **layerskip_settings
):
    """Loads a checkpoint (directory or GGUF) of a supported family as that family's LayerSkip causal LM
    (`LayerSkipQwen2ForCausalLM` for a Qwen2 checkpoint, ...) with plain, unquantized weights.

    A model loaded from GGUF is marked quantized and refuses `save_pretrained`, so its dequantized weights are
    moved into a fresh model. `layerskip_settings` are LayerSkip config fields (`exit_layer=8`, ...); `None`
    values keep the source's or the default value. `trust_remote_code` is passed to every loader (for sources
    with a custom tokenizer or config class). Returns `(model, tokenizer)`.
    """
    _check_settings(layerskip_settings)
    directory, gguf_file = split_source(source)
    loader_kwargs = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    # Reading a GGUF file's config costs as much as loading its weights, so GGUF sources are checked after loading.
    if gguf_file is None:
        layerskip_classes(AutoConfig.from_pretrained(directory, **loader_kwargs).model_type, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **loader_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(f"Could not load a tokenizer from {source}; a checkpoint needs one. ({error})") from error
    source_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **loader_kwargs)
    config_class, causal_lm_class = layerskip_classes(source_model.config.model_type, source)

    settings = {
        key: value
        for key, value in source_model.config.to_dict().items()
        if key not in _SOURCE_ONLY_CONFIG_KEYS and not key.startswith("_")
    }
    settings.update({key: value for key, value in layerskip_settings.items() if value is not None})
    config = config_class(**settings)
    with torch.device("meta"):
        model = causal_lm_class(config)
    model.load_state_dict(source_model.state_dict(), strict=True, assign=True)
    _copy_non_persistent_buffers(source_model, model)
    model.tie_weights()
    model.to(dtype).eval()
    model.generation_config = GenerationConfig.from_dict(
        {**source_model.generation_config.to_diff_dict(), **speculation_defaults(config), "_from_model_config": False}
    )
    return model, tokenizer


def _copy_non_persistent_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Moves buffers that state dicts leave out (the rotary tables) from `source` into `target`, built on meta."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            target.get_submodule(module_name).register_buffer(buffer_name, source_buffers[name], persistent=False)


def speculation_defaults(config) -> dict:
    """Generation-config settings that make `generate(assistant_early_exit=E)` draft `config.num_speculations`."""
    return {"num_assistant_tokens": config.num_speculations, "assistant_confidence_threshold": 0.0}


def convert(
    source: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **layerskip_settings,
) -> Path:
    """Converts `source` (a checkpoint directory or GGUF file of a supported family) into a LayerSkip checkpoint of
    that family at `output_dir`.

    The checkpoint holds safetensors weights, the config, the tokenizer, the generation config and the model's
    code, so it loads with `trust_remote_code=True` where `hf_layerskip` is not installed.
    """
    model, tokenizer = load_as_layerskip(source, dtype=dtype, trust_remote_code=trust_remote_code, **layerskip_settings)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir

