"""One parser for YAML and the command line: `--config file.yaml` sets defaults, flags override.

Built on `HfArgumentParser`, like TRL's parser. Unknown keys (in the file or on the command line) are
errors with a "did you mean", a key given twice in the file is an error naming both lines, and YAML values
are type-checked against the config's fields before anything runs. Floats may be written as YAML 1.2 does
(`learning_rate: 1e-5`, which YAML 1.1 would read as a string). `--config=PATH` and `--config PATH` both
work; a second `--config` is refused rather than silently ignored. `--config NAME` reads a config shipped in
`ark_hf/recipes/configs/` (`resolve_config_file`; a file of that name in the working folder wins).
`resume_from_checkpoint: true` means the latest `checkpoint-N` in `output_dir` (as
`Trainer.train(resume_from_checkpoint=True)` documents) and `false` means a fresh run.

`--help` lists ark_hf's own options first, grouped by the config class that declares them, and
`TrainingArguments`' after. `--verbose` shows the third-party output that `configure_console` quiets by default.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

__all__ = [
    "SHIPPED_CONFIG_DIR",
    "ConfigError",
    "StrictYamlLoader",
    "configure_console",
    "parse_config",
    "load_yaml_config",
    "resolve_config_file",
    "resolve_resume_from_checkpoint",
    "shipped_config_names",
]

T = TypeVar("T")

# The configs shipped inside the package (package data of `ark_hf.recipes`): `--config NAME` finds them by name.
SHIPPED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"
CONFIG_HELP = (
    "YAML file of option values, or the name of a shipped config (e.g. bge_m3_unified_self_distill); flags "
    "override it. Give it once, as `--config PATH` or `--config=PATH`. Floats may be written 1e-5 or 2.0e-5; "
    "a key given twice is an error."
)
VERBOSE_HELP = (
    "Show the third-party output quiet by default: transformers' 'Loading weights' and 'Writing model shards' bars, "
    "load reports that only list checkpoint weights the model does not use, DeepSpeed's accelerator detection "
    "warning when DeepSpeed is not used."
)
# transformers' `logging.tqdm` bars hidden at the default verbosity (the Trainer's own bars stay)
QUIET_BARS = ("Loading weights", "Writing model shards")
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
    """`" (did you mean 'x'?)"` for the closest candidate, or `""` (separators `-`/`_` ignored).

    A name whose words all occur in a candidate's, in order, suggests the shortest such candidate
    (`max_errors` -> `max_validation_errors`), when spelling alone finds nothing.
    """
    candidates = list(candidates)
    key = str(name).lstrip("-").replace("-", "_")
    exact = [c for c in candidates if c.replace("_", "") == key.replace("_", "")]
    close = exact or difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    if not close and key.count("_") >= 1:
        words = key.split("_")
        close = sorted((c for c in candidates if _words_in_order(words, str(c).split("_"))), key=len)[:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _words_in_order(words: list[str], candidate: list[str]) -> bool:
    remaining = iter(candidate)
    return all(word in remaining for word in words)


# words a user searches for, said next to the option's name in messages
KEY_WORDS = {
    "learning_rate": "the learning rate",
    "per_device_train_batch_size": "the training batch size per device",
    "per_device_eval_batch_size": "the evaluation batch size per device",
    "num_train_epochs": "the number of epochs",
    "weight_decay": "the weight decay",
    "gradient_accumulation_steps": "the gradient accumulation steps",
}


def describe_key(key: str) -> str:
    """`"key 'learning_rate' (the learning rate)"`: the option's name, with the words for it where they differ."""
    words = KEY_WORDS.get(key)
    return f"key '{key}' ({words})" if words else f"key '{key}'"


def _float_string(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def shipped_config_names() -> list[str]:
    """Names of the YAML files shipped in `ark_hf/recipes/configs/` (configs and stage plans), without `.yaml`."""
    return sorted(path.stem for path in SHIPPED_CONFIG_DIR.glob("*.yaml"))


def resolve_config_file(value: str | Path, what: str = "config file") -> Path:
    """The file `value` names: an existing path, else a shipped config's name (`bge_m3_dense` or `bge_m3_dense.yaml`).

    A file in the working directory wins over a shipped config of the same name. `what` names the kind of file in
    the error, which lists the shipped names and their folder.

    Example:
        >>> resolve_config_file("qwen3_full").name
        'qwen3_full.yaml'
    """
    path = Path(value)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        shipped = SHIPPED_CONFIG_DIR / f"{path.stem}.yaml"
        if shipped.is_file():
            return shipped
    raise ConfigError(
        f"{value}: {what} not found: neither a file nor a shipped config name "
        f"({', '.join(shipped_config_names())}, in {SHIPPED_CONFIG_DIR})"
    )


def load_yaml_config(path: str | Path, config_cls: type) -> dict[str, Any]:
    """Read a YAML config and check every key and value type against `config_cls`'s fields.

    `path` is a file or the name of a shipped config (`resolve_config_file`). Errors name the file, the line and
    the key: `cfg.yaml:3: key 'temprature': unknown option for BGETrainerConfig (did you mean 'temperature'?)`.
    """
    path = resolve_config_file(path)
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
        if isinstance(value, bool) and {"true", "false"} <= set(fields[key].metadata.get("choices", ())):
            data[key] = "true" if value else "false"  # a tri-state switch (`auto` / `true` / `false`)
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
            problems.append(
                f"{where}: {describe_key(key)}: expected {expected}, got {type(value).__name__} ({value!r})"
            )
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


class _QuietFilter(logging.Filter):
    """Drops third-party records that carry no information for this run (see `configure_console`)."""

    def __init__(self, *, deepspeed_used: bool) -> None:
        super().__init__()
        self.deepspeed_used = deepspeed_used

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "DeepSpeed":
            return self.deepspeed_used or not message.startswith("Setting accelerator to CPU")
        if "LOAD REPORT" in message:  # only UNEXPECTED keys (e.g. a pooler the model drops): nothing to act on
            return any(status in message for status in ("MISSING", "MISMATCH", "CONVERSION"))
        return True


_QUIET_LOGGERS = ("DeepSpeed", "transformers.modeling_utils")
_quiet_filter: _QuietFilter | None = None


def _quiet_bar(factory: Any, args: tuple, kwargs: dict) -> Any:
    from transformers.utils.logging import EmptyTqdm

    return EmptyTqdm(*args, **kwargs) if kwargs.get("desc") in QUIET_BARS else factory(*args, **kwargs)


def configure_console(verbose: bool = False, *, deepspeed_used: bool = False) -> None:
    """Quiet third-party noise (`verbose=False`, the default) or show everything (`verbose=True`).

    Quiet means: transformers' `Loading weights` and `Writing model shards` bars are not drawn (through
    `transformers.utils.logging.set_tqdm_hook`; download bars and the Trainer's bars stay), a load report that
    lists only UNEXPECTED checkpoint keys is dropped (reports with MISSING, MISMATCH or CONVERSION keys stay), and
    DeepSpeed's "Setting accelerator to CPU" warning is dropped unless `deepspeed_used`. The recipes call it
    through `parse_config` (`--verbose`).
    """
    global _quiet_filter
    from transformers.utils import logging as hf_logging

    from ark_hf.utils.quiet import set_verbose

    set_verbose(verbose)

    for name in _QUIET_LOGGERS:
        if _quiet_filter is not None:
            logging.getLogger(name).removeFilter(_quiet_filter)
    if verbose:
        if _quiet_filter is not None:
            hf_logging.set_tqdm_hook(None)
        _quiet_filter = None
        return
    _quiet_filter = _QuietFilter(deepspeed_used=deepspeed_used)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).addFilter(_quiet_filter)
    hf_logging.set_tqdm_hook(_quiet_bar)


def _own_options_first(parser: HfArgumentParser, config_cls: type) -> None:
    """Group `--help`: general options, then ark_hf's own options (fields `TrainingArguments` lacks) in one group
    per declaring class, then `TrainingArguments`' options; a short usage line instead of every flag."""
    from transformers import TrainingArguments

    if not (isinstance(config_cls, type) and issubclass(config_cls, TrainingArguments)):
        return
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    general = {"help", "config", "verbose"}
    optionals = parser._optionals
    moved: set[int] = set()

    def group_of(title: str, names: list[str]) -> None:
        group = parser.add_argument_group(title)
        for action in list(optionals._group_actions):
            if action.dest in names:
                optionals._group_actions.remove(action)
                group._group_actions.append(action)
                moved.add(id(action))

    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls) and issubclass(cls, TrainingArguments) and cls is not TrainingArguments:
            own = [n for n in vars(cls).get("__annotations__", {}) if n not in inherited]
            if own:
                group_of(f"{cls.__name__} (ark_hf options)", own)
    rest = [a.dest for a in optionals._group_actions if a.dest not in general and id(a) not in moved]
    group_of(f"TrainingArguments (transformers; defaults as {config_cls.__name__} sets them)", rest)
    parser.usage = f"%(prog)s [--config FILE.yaml] [--verbose] [--OPTION VALUE ...]  (options: {config_cls.__name__})"


def parse_config(config_cls: type[T], argv: list[str] | None = None, *, prog: str | None = None) -> T:
    """Parse `--config file.yaml` plus command-line overrides into one `config_cls` instance.

    `--verbose` is taken here too: without it third-party noise is quiet (`configure_console`). `prog` is the
    program name `--help` and usage errors show (default: the script's name).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_cls, prog=prog)
    parser.add_argument("--config", type=str, default=None, help=CONFIG_HELP)
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _own_options_first(parser, config_cls)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
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
    deepspeed_used = bool(getattr(config, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    configure_console(verbose, deepspeed_used=deepspeed_used)
    return config
