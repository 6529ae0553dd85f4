"""One parser for YAML and the command line: `--config file.yaml` sets defaults, flags override.

Built on `HfArgumentParser`, like TRL's parser. Unknown keys (in the file or on the command line) are
errors with a "did you mean", a key given twice in the file is an error naming both lines, and YAML values
are type-checked against the config's fields before anything runs. Floats may be written as YAML 1.2 does
(`learning_rate: 1e-5`, which YAML 1.1 would read as a string). `--config=PATH` and `--config PATH` both
work; a second `--config` is refused rather than silently ignored. `resume_from_checkpoint: true` means the
latest `checkpoint-N` in `output_dir` (as `Trainer.train(resume_from_checkpoint=True)` documents) and
`false` means a fresh run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

__all__ = ["ConfigError", "StrictYamlLoader", "parse_config", "load_yaml_config", "resolve_resume_from_checkpoint"]

T = TypeVar("T")

CONFIG_HELP = (
    "YAML file of option values; flags override it. Give it once, as `--config PATH` or `--config=PATH`. "
    "Floats may be written 1e-5 or 2.0e-5; a key given twice is an error."
)
_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off", "none", "null", "")


class ConfigError(ValueError):
    """A config file or command line that does not describe a valid run."""


class StrictYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys (naming both lines) and reads `1e-5` as a float.

    YAML 1.1, which PyYAML implements, only knows floats with a dot (`1.0e-5`); YAML 1.2 and every other
    tool read `1e-5` as a number, and so does this loader.

    Example:
        >>> yaml.load("lr: 1e-5", Loader=StrictYamlLoader)
        {'lr': 1e-05}
    """

    source_name = "<config>"

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"{self.source_name}:{line}: key '{key}': given twice (first at line {seen[key]}); "
                        "keep one of them"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


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


def did_you_mean(name: str, candidates: typing.Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest candidate, or `""` (separators `-`/`_` ignored)."""
    candidates = list(candidates)
    key = str(name).lstrip("-").replace("-", "_")
    exact = [c for c in candidates if c.replace("_", "") == key.replace("_", "")]
    close = exact or difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _float_string(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def load_yaml_config(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Read a YAML config and check every key and value type against `config_cls`'s fields.

    Errors name the file, the line and the key: `cfg.yaml:3: key 'temprature': unknown option for
    BGETrainerConfig (did you mean 'temperature'?)`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    loader = StrictYamlLoader(text)
    loader.source_name = str(path)
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from error
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    lines = _key_lines(text)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    # the declared annotations: HfArgumentParser rewrites `Field.type` in place (e.g. `dict | str | None` -> str)
    hints = typing.get_type_hints(config_cls)
    problems = []
    for key, value in list(data.items()):
        where = f"{path}:{lines.get(str(key), 0)}"
        if key not in fields:
            hint = did_you_mean(str(key), fields)
            problems.append(f"{where}: key '{key}': unknown option for {config_cls.__name__}{hint}")
            continue
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            data[key] = "true" if value else "false"  # resolved against output_dir in parse_config
            continue
        allowed = _allowed_types(hints.get(key, fields[key].type))
        if allowed is None or value is None and type(None) in allowed:
            continue
        if float in allowed and _float_string(value) is not None:
            data[key] = value = _float_string(value)  # `lr: "1e-5"`, quoted
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


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of each top-level key, for error messages."""
    lines: dict[str, int] = {}
    node = yaml.compose(text, Loader=StrictYamlLoader)
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return lines


def _take_config_path(argv: list[str]) -> str | None:
    """Remove `--config PATH` / `--config=PATH` from `argv` and return PATH; refuse it given twice."""
    found: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config":
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise ConfigError("--config needs a file path (--config PATH or --config=PATH)")
            found.append(argv[index + 1])
            del argv[index : index + 2]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            if not value:
                raise ConfigError("--config= needs a file path (--config PATH or --config=PATH)")
            found.append(value)
            del argv[index]
        else:
            index += 1
    if len(found) > 1:
        raise ConfigError(
            f"--config given {len(found)} times ({', '.join(found)}); pass one file (later flags override it)"
        )
    return found[0] if found else None


def resolve_resume_from_checkpoint(value: Any, output_dir: str | None) -> str | None:
    """Turn a boolean-looking `resume_from_checkpoint` into what `Trainer.train` documents.

    `true` (or `True`, `yes`): the latest `checkpoint-N` folder in `output_dir`, refused when there is none;
    `false`/`no`/empty: `None` (a fresh run). Anything else is returned unchanged (a checkpoint path).
    """
    if isinstance(value, bool):
        value = "true" if value else "false"
    if not isinstance(value, str):
        return value
    lowered = value.strip().lower()
    if lowered in _FALSE:
        return None
    if lowered not in _TRUE:
        return value
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if output_dir and Path(output_dir).is_dir() else None
    if last is None:
        raise ConfigError(
            f"key 'resume_from_checkpoint': '{value}' means the latest checkpoint-N in output_dir, but "
            f"{output_dir} holds none; pass a checkpoint folder or leave resume_from_checkpoint unset"
        )
    return last


def parse_config(config_cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `--config file.yaml` plus command-line overrides into one `config_cls` instance."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_cls)
    parser.add_argument("--config", type=str, default=None, help=CONFIG_HELP)
    config_path = _take_config_path(argv)
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
        options = [o.lstrip("-") for action in parser._actions for o in action.option_strings if o.startswith("--")]
        hints = [f"{arg}{hint}" for arg in remaining if (hint := did_you_mean(arg.split("=", 1)[0], options))]
        extra = f" ({'; '.join(hints)})" if hints else ""
        raise ConfigError(f"unknown command-line arguments: {' '.join(remaining)}{extra}")
    if hasattr(config, "resume_from_checkpoint"):
        config.resume_from_checkpoint = resolve_resume_from_checkpoint(
            config.resume_from_checkpoint, getattr(config, "output_dir", None)
        )
    return config
