"""Checkpoint merging: spherical (slerp) or linear interpolation of saved weights.

Qwen3-Embedding's third stage merges several checkpoints of the supervised fine-tuning run with slerp
(Zhang et al., "Qwen3 Embedding: Advancing Text Embedding and Reranking Through Foundation Models",
arXiv 2506.05176, §3.2; after Li et al., arXiv 2410.15035). The report gives neither the number of
checkpoints nor the weights, so both are arguments here.

Every tensor is merged on its own, as a flat vector:

- `linear`: the weighted mean `sum_i w_i x_i / sum_i w_i`;
- `slerp` of two tensors: `sin((1 - t) θ) / sin θ · a + sin(t θ) / sin θ · b`, where θ is the angle between
  `a` and `b`. It follows the great circle instead of the chord, so the merged tensor keeps about the norm of
  its parents where a plain average of two diverged checkpoints shrinks it. When `a` and `b` are (anti)parallel
  sin θ vanishes and slerp falls back to linear interpolation, which is then the same curve.
- `slerp` of more than two tensors is not uniquely defined; here it folds left:
  `m_1 = x_1`, `m_k = slerp(m_{k-1}, x_k, t_k)` with `t_k = w_k / (w_1 + ... + w_k)`. For colinear inputs
  this is exactly the weighted mean, and with equal weights each checkpoint pulls with the same weight
  (1/2, 1/3, 1/4, ...). The result depends on the order of the checkpoints.

Example:

```python
from ark_hf.merging import merge_checkpoints

merge_checkpoints(["out/checkpoint-1000", "out/checkpoint-2000"], "out/merged", method="slerp", t=0.5)
```

Checkpoints can be full models (`model.safetensors`, sharded safetensors, or `pytorch_model.bin`) or LoRA
adapter folders (`adapter_model.safetensors`). Note that merging two adapters merges their A and B matrices
separately, which is *not* the same as merging the weight updates `B @ A` (the product of averages differs from
the average of products); to merge what the adapters do, export them merged first
(`DecoderEmbedder.save_pretrained(..., merge_lora=True)`) and merge the full models.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ark_hf.constants import ADAPTER_SUBFOLDER, ADAPTER_WEIGHT_FILES

logger = logging.get_logger(__name__)

__all__ = ["slerp", "merge_state_dicts", "merge_checkpoints", "load_checkpoint_weights"]

MergeMethod = Literal["slerp", "linear"]

# Weight files, in the order `transformers` looks for them.
FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FULL_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Trainer / DeepSpeed state of the *unmerged* run: copying it would pretend the merged model can resume it.
TRAINER_STATE_PATTERNS = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "latest",
    "zero_to_fp32.py",
    "global_step*",
)


# ----------------------------------------------------------------------------------------------------- maths
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 lose too much in the angle and the sines; float64 inputs keep their precision
    return torch.float64 if dtype == torch.float64 else torch.float32


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical linear interpolation between two tensors, treated as flat vectors.

    `t = 0` gives `a`, `t = 1` gives `b`. The angle θ comes from the normalised vectors, the interpolation
    is applied to the original ones: `sin((1 - t) θ) / sin θ · a + sin(t θ) / sin θ · b`.

    Args:
        a, b: tensors of the same shape.
        t: interpolation factor in [0, 1].
        eps: norms below this count as zero vectors (no direction): linear interpolation is used.
        dot_threshold: when `|cos θ|` exceeds it the vectors are nearly (anti)parallel, `sin θ` is close to 0
            and the slerp weights lose precision, so linear interpolation is used (mergekit's choice).

    Returns:
        A tensor with the shape and dtype of `a` (computed in float32, or float64 for float64 inputs).
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp factor t must lie in [0, 1], got {t}")
    compute = _compute_dtype(a.dtype)
    va = a.reshape(-1).to(compute)
    vb = b.reshape(-1).to(compute)
    norm_a, norm_b = va.norm(), vb.norm()
    if norm_a < eps or norm_b < eps:
        merged = (1.0 - t) * va + t * vb
    else:
        cos_theta = torch.dot(va / norm_a, vb / norm_b).clamp(-1.0, 1.0)
        if cos_theta.abs() > dot_threshold:
            merged = (1.0 - t) * va + t * vb
        else:
            theta = torch.arccos(cos_theta)
            sin_theta = torch.sin(theta)
            merged = (torch.sin((1.0 - t) * theta) / sin_theta) * va + (torch.sin(t * theta) / sin_theta) * vb
    return merged.reshape(a.shape).to(a.dtype)


def _resolve_weights(
    count: int, method: MergeMethod, weights: Sequence[float] | None, t: float | None
) -> tuple[list[float] | None, float | None]:
    """Check the merge arguments; returns (weights, t) where exactly one drives the merge."""
    if method not in ("slerp", "linear"):
        raise ValueError(f"method must be 'slerp' or 'linear', got {method!r}")
    if count == 0:
        raise ValueError("nothing to merge: the list of state dicts / checkpoints is empty")
    if weights is not None and t is not None:
        raise ValueError("pass either `weights` or `t`, not both (`t` is the two-checkpoint shorthand)")
    if t is not None:
        if count != 2:
            raise ValueError(f"`t` interpolates between exactly two checkpoints, got {count}; use `weights`")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        return None, t
    if weights is None:
        return ([1.0] * count, None) if method == "linear" or count != 2 else (None, 0.5)
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} checkpoints")
    if method == "slerp" and any(w <= 0 for w in weights):
        raise ValueError(f"slerp weights must all be positive (t_k = w_k / (w_1 + ... + w_k)), got {weights}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return weights, None


def _merge_tensors(
    tensors: list[torch.Tensor], method: MergeMethod, weights: list[float] | None, t: float | None
) -> torch.Tensor:
    if method == "linear":
        if weights is None:  # two checkpoints and `t`
            weights = [1.0 - t, t]
        compute = _compute_dtype(tensors[0].dtype)
        total = sum(weights)
        merged = sum(w / total * x.to(compute) for w, x in zip(weights, tensors))
        return merged.to(tensors[0].dtype)
    if weights is None:
        return slerp(tensors[0], tensors[1], t)
    merged, cumulative = tensors[0], weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        cumulative += weight
        merged = slerp(merged, tensor, weight / cumulative)
    return merged


def merge_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]],
    *,
    method: MergeMethod = "slerp",
    weights: Sequence[float] | None = None,
    t: float | None = None,
) -> dict[str, torch.Tensor]:
    """Merge state dicts tensor by tensor.

    Args:
        state_dicts: dicts with the same keys and shapes.
        method: `slerp` or `linear` (see the module docstring for the formulas).
        weights: one weight per state dict. `linear`: weighted mean (weights are normalised). `slerp`: left
            fold with `t_k = w_k / (w_1 + ... + w_k)`, all weights positive. Default: equal weights.
        t: shorthand for two state dicts: the factor from the first (`t = 0`) to the second (`t = 1`);
            for `linear` it means weights `(1 - t, t)`. Default 0.5. Not allowed together with `weights`.

    Returns:
        A new dict. Floating-point tensors are merged and keep their dtype; other tensors (integer buffers
        such as position ids) are copied from the first state dict.
    """
    weights, t = _resolve_weights(len(state_dicts), method, weights, t)
    first = state_dicts[0]
    for index, other in enumerate(state_dicts[1:], start=1):
        if other.keys() != first.keys():
            missing = sorted(first.keys() - other.keys())[:5]
            extra = sorted(other.keys() - first.keys())[:5]
            raise ValueError(
                f"state dict {index} has different keys than state dict 0: missing {missing}, extra {extra}"
            )
    merged: dict[str, torch.Tensor] = {}
    for key, reference in first.items():
        tensors = [state_dict[key] for state_dict in state_dicts]
        for index, tensor in enumerate(tensors[1:], start=1):
            if tensor.shape != reference.shape:
                raise ValueError(
                    f"{key}: shape {tuple(tensor.shape)} in state dict {index} differs from {tuple(reference.shape)}"
                )
        if not reference.is_floating_point() or len(tensors) == 1:
            merged[key] = reference.detach().clone()
        else:
            merged[key] = _merge_tensors([x.detach() for x in tensors], method, weights, t)
    return merged


# ------------------------------------------------------------------------------------------------ checkpoints
class _Checkpoint:
    """The weight files of one saved folder, read one tensor at a time (safetensors) or memory-mapped (.bin)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: checkpoint folder not found")
        self.kind, self.index_file, self.files = self._find_files()
        self.key_to_file: dict[str, str] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.metadata: dict[str, str] | None = None
        for name in self.files:
            for key in self._keys_of(name):
                self.key_to_file[key] = name

    def _find_files(self) -> tuple[str, str | None, list[str]]:
        for name in ADAPTER_WEIGHT_FILES:
            if (self.path / name).is_file():
                return "adapter", None, [name]
        for name in FULL_INDEX_FILES:
            if (self.path / name).is_file():
                weight_map = json.loads((self.path / name).read_text(encoding="utf-8"))["weight_map"]
                return "full", name, sorted(set(weight_map.values()))
        for name in FULL_WEIGHT_FILES:
            if (self.path / name).is_file():
                return "full", None, [name]
        raise FileNotFoundError(
            f"{self.path}: no weights found (looked for {', '.join(ADAPTER_WEIGHT_FILES + FULL_INDEX_FILES + FULL_WEIGHT_FILES)})"
        )

    def _keys_of(self, name: str) -> list[str]:
        if name.endswith(".safetensors"):
            with safe_open(self.path / name, framework="pt") as handle:
                if self.metadata is None:
                    self.metadata = handle.metadata()
                return list(handle.keys())
        return list(self._load_bin(name).keys())

    def _load_bin(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._bin_cache:
            # mmap keeps a multi-gigabyte .bin on disk until a tensor is touched; weights_only refuses pickled code
            self._bin_cache[name] = torch.load(self.path / name, map_location="cpu", weights_only=True, mmap=True)
        return self._bin_cache[name]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def get(self, key: str) -> torch.Tensor:
        name = self.key_to_file[key]
        if name.endswith(".safetensors"):
            with safe_open(self.path / name, framework="pt") as handle:
                return handle.get_tensor(key)
        return self._load_bin(name)[key]

    def shards(self) -> list[tuple[str, list[str]]]:
        """(output safetensors file name, keys) per weight file, in this checkpoint's own layout."""
        by_file: dict[str, list[str]] = {name: [] for name in self.files}
        for key, name in self.key_to_file.items():
            by_file[name].append(key)
        return [(_safetensors_name(name), keys) for name, keys in by_file.items()]

    def is_weight_file(self, relative: str) -> bool:
        return relative in self.files or relative == self.index_file


def _safetensors_name(name: str) -> str:
    """`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors` (what transformers looks for)."""
    if name.endswith(".safetensors"):
        return name
    stem = name[: -len(".bin")]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def load_checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a saved folder (full model, sharded or not, or LoRA adapter) as one CPU state dict."""
    checkpoint = _Checkpoint(path)
    return {key: checkpoint.get(key) for key in checkpoint.keys()}


def _check_adapter_configs(checkpoints: list[_Checkpoint]) -> None:
    """Adapters with another rank fail on shapes; another alpha or target set would merge silently, so check."""
    fields = ("peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    reference = None
    for checkpoint in checkpoints:
        config_file = checkpoint.path / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing next to {checkpoint.files[0]}")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        values = {field: config.get(field) for field in fields}
        if isinstance(values["target_modules"], list):
            values["target_modules"] = sorted(values["target_modules"])
        if reference is None:
            reference = (checkpoint.path, values)
        elif values != reference[1]:
            raise ValueError(
                f"adapter configs differ: {reference[0]} has {reference[1]}, {checkpoint.path} has {values}"
            )


def _is_trainer_state(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TRAINER_STATE_PATTERNS)


def _copy_other_files(source: _Checkpoint, destination: Path) -> None:
    """Config, tokenizer, sentence-transformers modules...: everything of the first checkpoint but its weights."""
    skipped = []
    for entry in sorted(source.path.iterdir()):
        if source.is_weight_file(entry.name) or entry.name in ADAPTER_WEIGHT_FILES:
            continue
        if _is_trainer_state(entry.name) or entry.name == ADAPTER_SUBFOLDER:
            skipped.append(entry.name)
            continue
        if entry.is_dir():
            shutil.copytree(entry, destination / entry.name)
        else:
            shutil.copy2(entry, destination / entry.name)
    if skipped:
        logger.info("Not copied from %s (state of the unmerged run): %s", source.path, ", ".join(skipped))


def merge_checkpoints(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: MergeMethod = "slerp",
    weights: Sequence[float] | None = None,
    t: float | None = None,
    overwrite: bool = False,
) -> str:
    """Merge the weights of saved checkpoints into a new folder.

    Tensors are merged one at a time (see `merge_state_dicts` for `method`, `weights` and `t`), so memory
    holds one output shard plus one tensor per checkpoint, not whole models. The output keeps the first
    checkpoint's shard layout, always as safetensors (a `pytorch_model*.bin` input becomes
    `model*.safetensors`), and every other file of the first checkpoint is copied (config, tokenizer,
    sentence-transformers modules, model card), except trainer state such as `optimizer.pt` and the
    `lora_adapter/` that `DecoderEmbedder` keeps next to merged LoRA weights. `merge_info.json` records the
    inputs, method and weights.

    The folder is written under a temporary name next to `output_dir` and renamed at the end, so a crash
    never leaves a half-written model behind.

    Args:
        paths: checkpoint folders, all full models or all LoRA adapters, with the same tensor names.
        output_dir: the folder to create.
        method, weights, t: see `merge_state_dicts`.
        overwrite: replace an existing `output_dir` (otherwise `FileExistsError`).

    Returns:
        `output_dir` as a string.
    """
    weights, t = _resolve_weights(len(paths), method, weights, t)
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True to replace it")
    checkpoints = [_Checkpoint(path) for path in paths]
    first = checkpoints[0]
    kinds = {checkpoint.kind for checkpoint in checkpoints}
    if len(kinds) > 1:
        raise ValueError(
            f"cannot merge full models with LoRA adapters: {[(str(c.path), c.kind) for c in checkpoints]}"
        )
    if first.kind == "adapter":
        _check_adapter_configs(checkpoints)
    reference_keys = set(first.keys())
    for checkpoint in checkpoints[1:]:
        if set(checkpoint.keys()) != reference_keys:
            missing = sorted(reference_keys - set(checkpoint.keys()))[:5]
            extra = sorted(set(checkpoint.keys()) - reference_keys)[:5]
            raise ValueError(
                f"{checkpoint.path} has other tensors than {first.path}: missing {missing}, extra {extra}"
            )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        _copy_other_files(first, staging)
        metadata = first.metadata or {"format": "pt"}
        shards = first.shards()
        weight_map: dict[str, str] = {}
        total_size = 0
        for file_name, keys in shards:
            merged = merge_state_dicts(
                [{key: checkpoint.get(key) for key in keys} for checkpoint in checkpoints],
                method=method,
                weights=weights,
                t=t,
            )
            # safetensors refuses tensors that share storage or are not contiguous
            merged = {key: tensor.contiguous() for key, tensor in merged.items()}
            save_file(merged, str(staging / file_name), metadata=metadata)
            for key, tensor in merged.items():
                weight_map[key] = file_name
                total_size += tensor.numel() * tensor.element_size()
            del merged
        if first.index_file is not None:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_merge_info(staging, paths, method, weights, t)
        _replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Merged %d checkpoints (%s) into %s", len(checkpoints), method, output_dir)
    return str(output_dir)


def _write_merge_info(
    folder: Path, paths: Sequence[str | os.PathLike], method: str, weights: list[float] | None, t: float | None
) -> None:
    info = {"method": method, "checkpoints": [str(path) for path in paths], "weights": weights, "t": t}
    (folder / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _replace_dir(staging: Path, output_dir: Path) -> None:
    """Move the finished folder into place; an old folder is moved aside first and deleted only afterwards."""
    if not output_dir.exists():
        os.rename(staging, output_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.rename(output_dir, trash / output_dir.name)
    os.rename(staging, output_dir)
    shutil.rmtree(trash, ignore_errors=True)
