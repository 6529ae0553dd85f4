"""Checks of model files, run by the models as they load and by `preflight` before any weights load.

A truncated safetensors file, a head file of another model, a tokenizer that cannot be the model's (transformers
builds a 5-token XLM-R tokenizer from a folder without tokenizer files), a checkpoint of another architecture, a
model name that is neither a folder nor in the Hub's cache: each is refused here with the file and what it should
hold, before the weights load. Config and output-directory checks stay in `ark_hf.utils.preflight`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ark_hf.utils.cli import ConfigError

__all__ = [
    "find_model_file",
    "ModelFileError",
    "ModelNotFoundError",
    "TokenizerError",
    "check_checkpoint_matches",
    "check_model_exists",
    "check_model_folder",
    "check_safetensors_file",
    "check_tokenizer",
    "check_weight_files",
    "load_head_state",
    "read_json_file",
]


def find_model_file(path: str, filename: str, **hub_kwargs: Any) -> str | None:
    """`filename` of a model folder or Hub repo (cache or download), or None when it has none; a missing file or
    an unreachable Hub is None, never an error (the callers say what is missing)."""
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
PROBE_SENTENCE = "The quick brown fox jumps over the lazy dog; 2024 permits cost 150 euros."
# a tokenizer with fewer entries than this share of the embedding rows was not made for the model
MIN_VOCAB_SHARE = 0.5
# config entries that must agree between a model and a checkpoint resumed into it
CHECKPOINT_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


class ModelFileError(ValueError):
    """A model file (weights, head, `m3_heads.json`, checkpoint) is unreadable or not what the model needs."""


class ModelNotFoundError(ValueError):
    """`model_name_or_path` (or `ark-hf eval MODEL`) names neither a local model folder nor a model the Hub or its
    cache holds."""


class TokenizerError(ValueError):
    """The tokenizer cannot belong to the model (far too small, or it turns text into unknown/no tokens)."""


# -------------------------------------------------------------------------------------------- model files
def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """`json.load` of a model file, with an error naming the file and what it should hold."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: cannot be read as JSON ({error}); expected {what}") from error


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Check a `.safetensors` file's header and size without reading its tensors (truncation, corruption).

    The format is an 8-byte little-endian header length `N`, `N` bytes of JSON (`name -> {dtype, shape,
    data_offsets}`), then the tensor bytes; the largest end offset must equal the bytes after the header.
    """
    path = Path(path)
    size = path.stat().st_size
    expected = "a safetensors file (8-byte header length, JSON header, tensor data)"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{path}: truncated ({size} bytes); expected {expected}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ModelFileError(
                f"{path}: truncated or corrupt: the header says {header_len} header bytes but the file has "
                f"{size} bytes in all; expected {expected}"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelFileError(f"{path}: corrupt header ({error}); expected {expected}") from error
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt header; expected {expected}")
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    need = max(ends, default=0)
    have = size - 8 - header_len
    if need != have:
        raise ModelFileError(
            f"{path}: truncated or corrupt: its {len(ends)} tensors need {need} data bytes but the file holds "
            f"{have}; re-download or re-save the model"
        )


def check_weight_files(folder: str | os.PathLike) -> None:
    """Check every safetensors file of a local model folder (and that a sharded index's shards exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for index_file in folder.glob("*.safetensors.index.json"):
        index = read_json_file(index_file, "a safetensors index with a 'weight_map'")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise ModelFileError(f"{index_file}: names shard(s) that are missing: {', '.join(missing)}")
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(file)


def load_head_state(path: str | os.PathLike, *, hidden_size: int, out_features: int | None = None) -> dict:
    """Read a BGE-M3 head file (`colbert_linear.pt` / `sparse_linear.pt`), checking it is a complete state dict
    of an `nn.Linear(hidden_size, out_features)`.

    Raises:
        ModelFileError: naming the file and the expected keys and shapes.
    """
    import torch

    shape = f"[{out_features if out_features is not None else 'dim'}, {hidden_size}]"
    expected = f"a state dict of nn.Linear: 'weight' {shape} and 'bias' [{out_features or 'dim'}]"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, ...: torch names no file
        raise ModelFileError(
            f"{path}: cannot be read ({type(error).__name__}: {error}); the file may be truncated; expected {expected}"
        ) from error
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ModelFileError(f"{path}: holds {keys}; expected {expected}")
    weight, bias = state["weight"], state["bias"]
    ok = (
        weight.dim() == 2
        and weight.shape[1] == hidden_size
        and (out_features is None or weight.shape[0] == out_features)
        and tuple(bias.shape) == (weight.shape[0],)
    )
    if not ok:
        raise ModelFileError(
            f"{path}: 'weight' has shape {list(weight.shape)} and 'bias' {list(bias.shape)}; expected {expected} "
            f"(the model's hidden size is {hidden_size}: is this head from another model?)"
        )
    return state


def check_checkpoint_matches(checkpoint: str | os.PathLike, model_config: Any) -> None:
    """Refuse resuming from a checkpoint of another model: its `config.json` must agree on the architecture.

    Args:
        checkpoint: the checkpoint folder.
        model_config: the model's `PretrainedConfig` (or a dict).
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ConfigError(f"key 'resume_from_checkpoint': {checkpoint} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / "adapter_config.json").is_file() or (folder / "lora_adapter").is_dir():
            return  # adapter-only checkpoints are checked by peft when loaded
        raise ModelFileError(f"{folder}: no config.json; expected a checkpoint folder written by this trainer")
    saved = read_json_file(config_file, "a model config")
    current = model_config if isinstance(model_config, dict) else model_config.to_dict()
    differ = [
        f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}"
        for key in CHECKPOINT_CONFIG_KEYS
        if key in saved and key in current and saved.get(key) != current.get(key)
    ]
    if differ:
        raise ModelFileError(
            f"{folder}: this checkpoint belongs to another model ({'; '.join(differ)}); resume from a checkpoint "
            "of this run's model_name_or_path"
        )


# ------------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_files_note(folder: str | os.PathLike | None) -> str:
    if folder is None or not Path(folder).is_dir():
        return ""
    found = [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
    if not found:
        return f"; {folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
    return f"; tokenizer files in {folder}: {', '.join(found)}"


def check_tokenizer(tokenizer: Any, *, vocab_size: int | None = None, folder: str | os.PathLike | None = None) -> None:
    """Refuse a tokenizer that cannot belong to the model.

    A folder without tokenizer files still "loads" a tokenizer that transformers builds from nothing (5 tokens
    for XLM-R, so every word is `<unk>`; 1 token for Qwen3, so every text is empty). Refused here: a
    vocabulary smaller than `MIN_VOCAB_SHARE` of the embedding matrix's rows, and a tokenizer that maps the
    probe sentence to no ids or only unknown ids. (A tokenizer *larger* than the matrix is refused by the
    trainer's `check_lengths_and_vocab`.)

    Args:
        tokenizer: the tokenizer.
        vocab_size: rows of the model's embedding matrix (`config.vocab_size`).
        folder: where it was loaded from, to list the tokenizer files found (or missing) there.

    Raises:
        TokenizerError: naming the folder and its tokenizer files.
    """
    where = f"{folder}: " if folder is not None else ""
    note = _tokenizer_files_note(folder)
    size = len(tokenizer)
    if vocab_size is not None and size < MIN_VOCAB_SHARE * vocab_size:
        raise TokenizerError(
            f"{where}the tokenizer has {size} tokens but the model's embedding matrix has {vocab_size} rows: it "
            f"is not this model's tokenizer (missing or wrong tokenizer files){note}"
        )
    ids = tokenizer(PROBE_SENTENCE, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids:
        raise TokenizerError(f"{where}the tokenizer turns the sentence {PROBE_SENTENCE!r} into no tokens{note}")
    if unk is not None and all(token == unk for token in ids):
        raise TokenizerError(
            f"{where}the tokenizer maps every token of {PROBE_SENTENCE!r} to the unknown token "
            f"{tokenizer.unk_token!r}{note}"
        )


def check_model_exists(name: str, key: str = "model_name_or_path") -> None:
    """The one check for "model not found": `name` must be a local folder, or a Hub name that the Hub (or, offline,
    the local cache) can serve.

    A name that looks like a path (`./m`, `/m`, `~/m`, `a/b/c`, `m/`) must be a folder; a name that does not is taken
    for a Hub repository and, with `HF_HUB_OFFLINE=1`, must be in the cache. Online Hub names are left to
    `check_model_folder`, which turns the Hub's answer into the same error.

    Raises:
        ModelNotFoundError: naming `key`, what was looked for, and the closest local folder when there is one.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    from ark_hf.data.loading import missing_path_hint

    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelNotFoundError(
            f"{key} '{name}': is a file; expected a model folder (config.json, weights) or a Hub name"
        )
    looks_local = (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )
    if looks_local:
        raise ModelNotFoundError(f"{key} '{name}': no such model folder{missing_path_hint(path)}")
    if constants.HF_HUB_OFFLINE:
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid repository id either
            cached = None
        if not isinstance(cached, str):
            raise ModelNotFoundError(
                f"{key} '{name}': neither a local folder{missing_path_hint(path)} nor a model in the Hugging Face "
                "cache, and HF_HUB_OFFLINE=1 keeps the Hub from being asked; pass the path of a model folder, or "
                "download the model first"
            )


def check_model_folder(name: str, *, trust_remote_code: bool = False) -> Any:
    """Load a model's config and tokenizer (no weights), check the tokenizer and the weight files.

    Returns:
        The model's `PretrainedConfig` (None for adapter-only folders, whose base model is checked on load).

    Raises:
        ModelNotFoundError: no such folder, or a Hub name the Hub or its cache does not hold.
    """
    from transformers import AutoConfig, AutoTokenizer

    check_model_exists(name)
    folder = name if os.path.isdir(name) else None
    if folder is not None and (Path(folder) / "adapter_config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as error:  # the Hub has no such repository, or cannot be reached
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"model_name_or_path '{name}': cannot be loaded ({reason})") from error
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    check_tokenizer(tokenizer, vocab_size=getattr(config, "vocab_size", None), folder=folder)
    if folder is not None:
        check_weight_files(folder)
    return config
