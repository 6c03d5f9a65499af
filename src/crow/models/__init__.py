"""Models: safe loading (``load_model``), the packaged offline models behind the aliases, tiny random test models."""

from .loading import LoadedModel, check_weights_safe, describe_source, load_adapter, load_model
from .packaged import ALIASES, cache_dir, convert_gguf_once, default_device, device_label, resolve_model
from .tiny import TINY_ARCHITECTURES, build_tiny_model, tiny_config, train_tokenizer

__all__ = ["ALIASES", "LoadedModel", "TINY_ARCHITECTURES", "build_tiny_model", "cache_dir", "check_weights_safe",
           "convert_gguf_once", "default_device", "describe_source", "device_label", "load_adapter", "load_model",
           "resolve_model", "tiny_config", "train_tokenizer"]
