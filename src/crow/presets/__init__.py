"""The measured recipes as package data: ``load_preset(name)`` reads ``<name>.yaml`` beside this module, a mapping of
``crow purify`` options (the method, its config's fields, ``max_length``)."""

from __future__ import annotations

from importlib import resources

from ..errors import CrowError


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """The options of the preset ``name``; an unknown name is refused with the valid ones."""
    import yaml

    if name not in preset_names():
        raise CrowError(f"unknown preset {name!r}; valid: {', '.join(preset_names())}")
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return {str(k).replace("-", "_"): v for k, v in (yaml.safe_load(text) or {}).items()}
