"""One parser for YAML and the command line: `--config file.yaml` sets defaults, flags override.

Built on `HfArgumentParser`, like TRL's parser. Unknown keys (in the file or on the command line) are
errors, and YAML values are type-checked against the config's fields before anything runs.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

__all__ = ["ConfigError", "parse_config", "load_yaml_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or command line that does not describe a valid run."""


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """Python types a YAML value may have for a dataclass field annotation (None: not checked)."""
    if isinstance(annotation, str):
        annotation = eval(
            annotation, vars(typing), {}
        )  # dataclass annotations under `from __future__ import annotations`
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allowed: list[type] = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                allowed.append(type(None))
                continue
            sub = _allowed_types(arg)
            if sub is None:
                return None
            allowed.extend(sub)
        return tuple(allowed)
    if origin in (list, tuple):
        return (list,)
    if origin is dict:
        return (dict,)
    if annotation is bool:
        return (bool,)
    if annotation is int:
        return (int,)
    if annotation is float:
        return (int, float)
    if annotation is str:
        return (str,)
    return None


def load_yaml_config(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Read a YAML config and check every key and value type against `config_cls`'s fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    lines = _key_lines(path)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    # the declared annotations: HfArgumentParser rewrites `Field.type` in place (e.g. `dict | str | None` -> str)
    hints = typing.get_type_hints(config_cls)
    problems = []
    for key, value in data.items():
        where = f"{path}:{lines.get(key, 0)}"
        if key not in fields:
            close = [name for name in fields if name.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{where}: key '{key}': unknown option for {config_cls.__name__}{hint}")
            continue
        allowed = _allowed_types(hints.get(key, fields[key].type))
        if allowed is None or value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed) or (list in allowed and not isinstance(value, dict))
        if not ok:
            expected = " or ".join(sorted({t.__name__ for t in allowed}))
            problems.append(f"{where}: key '{key}': expected {expected}, got {type(value).__name__} ({value!r})")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))

    def as_list_if_needed(key: str, value: Any) -> Any:
        allowed = _allowed_types(hints.get(key)) or ()
        return [value] if list in allowed and value is not None and not isinstance(value, list) else value

    return {key: as_list_if_needed(key, value) for key, value in data.items()}


def _key_lines(path: Path) -> dict[str, int]:
    """1-based line of each top-level key, for error messages."""
    lines: dict[str, int] = {}
    node = yaml.compose(path.read_text(encoding="utf-8"))
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return lines


def parse_config(config_cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--config file.yaml` plus command-line overrides into one `config_cls` instance."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_cls)
    parser.add_argument("--config", type=str, default=None, help="YAML file of option values; flags override it.")
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        config_path = argv[index + 1]
        del argv[index : index + 2]
    defaults = load_yaml_config(config_path, config_cls) if config_path else {}
    # required fields (output_dir) may come from the file: drop "required" once the file provides them
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False
    parser.set_defaults(**defaults)
    try:
        results = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as error:
        source = f" (with {config_path})" if config_path else ""
        raise ConfigError(f"invalid configuration{source}: {error}") from error
    # results: (config, [namespace of extra arguments,] remaining strings)
    config, remaining = results[0], results[-1]
    if remaining:
        raise ConfigError(f"unknown command-line arguments: {' '.join(remaining)}")
    return config
