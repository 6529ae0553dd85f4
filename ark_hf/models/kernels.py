"""Kernel switches for a retriever's backbone: liger-kernel's fused Triton kernels and `torch.compile`.

Both act on the transformers backbone under an ark_hf model (`model.backbone` for `DecoderEmbedder`,
`model.model` for `BGEM3Model`), in place: parameters, their names and checkpoints stay as they were, so
optimizers, saving and loading see no difference. Where a kernel cannot run (the package is not installed,
no CUDA, no liger kernels for the architecture, no compiler for inductor) the switch warns once, naming
itself, and the plain modules run: a config written for a GPU machine still trains on a laptop.

Example:
    ```python
    from ark_hf.models.kernels import apply_kernel_switches

    applied = apply_kernel_switches(model, liger_kernel=True, compile_backbone=True)
    # {'liger_kernel': True, 'compile_backbone': True} on an H200; False (and a warning each) on CPU
    ```
"""

from __future__ import annotations

import importlib
import inspect
import shutil

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "apply_kernel_switches",
    "apply_liger_kernel",
    "apply_padding_free",
    "apply_torch_compile",
    "inductor_available",
]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _backbone(model: nn.Module) -> nn.Module:
    """The transformers model under an ark_hf model (or the model itself), without a peft wrapper."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        backbone = getattr(model, "model", model)
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone


def _device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def apply_liger_kernel(model: nn.Module, *, switch: str = "liger_kernel", device: str | None = None) -> bool:
    """Patch the backbone with liger-kernel's fused RMSNorm, SwiGLU MLP and RoPE (in place).

    Runs liger's `apply_liger_kernel_to_<model_type>(model=backbone, ...)` with the kernels that serve
    embedding training (`rms_norm`, `swiglu`, `rope`; no fused cross-entropy: there are no LM logits).

    Args:
        model: an ark_hf model or a transformers backbone.
        switch: the config key named in the warnings.
        device: where training runs (`"cuda"`, `"cpu"`); default: the backbone's parameters' device, or
            CUDA when it is available (the Trainer moves the model after this call).

    Returns:
        True when the kernels are in place; False after a warning (naming `switch`) when they cannot run.
    """
    backbone = _backbone(model)
    kind = device or ("cuda" if torch.cuda.is_available() else _device(backbone).type)
    if kind != "cuda":
        _warn_once(
            f"{switch}:device", f"{switch}=True needs CUDA (liger's kernels are Triton); running the plain modules"
        )
        return False
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except Exception as error:  # ImportError, or triton failing at import
        _warn_once(
            f"{switch}:import",
            f"{switch}=True but liger-kernel does not import ({type(error).__name__}: {error}); "
            "`pip install liger-kernel`; running the plain modules",
        )
        return False
    model_type = getattr(backbone.config, "model_type", None)
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        _warn_once(
            f"{switch}:{model_type}",
            f"{switch}=True but liger-kernel has no kernels for model_type {model_type!r}; running the plain modules",
        )
        return False
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
    wanted.update({"fused_linear_cross_entropy": False, "layer_norm": True, "geglu": True})
    accepted = inspect.signature(apply).parameters
    apply(model=backbone, **{key: value for key, value in wanted.items() if key in accepted})
    logger.info("%s: liger-kernel applied to the %s backbone", switch, model_type)
    return True


def inductor_available(device: str) -> bool:
    """Whether `torch.compile`'s default backend (inductor) can generate code for `device`."""
    if device == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        return bool(has_triton())
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception:
        return False
    return shutil.which(compiler) is not None


def _compile_device(model: nn.Module) -> str:
    return "cuda" if torch.cuda.is_available() else _device(_backbone(model)).type


def apply_torch_compile(
    model: nn.Module, *, switch: str = "compile_backbone", device: str | None = None, **compile_kwargs
) -> bool:
    """`torch.compile` the backbone in place (`nn.Module.compile`: names, state dict and hooks unchanged).

    Shapes change from step to step (and with `padding_free` the packed length does), so `dynamic=True` is the
    default; keyword arguments go to `torch.compile`.

    Returns:
        True when compiled; False after a warning (naming `switch`) when the backend's compiler is missing.
    """
    backbone = _backbone(model)
    kind = device or _compile_device(model)
    backend = compile_kwargs.get("backend", "inductor")
    if backend == "inductor" and not inductor_available(kind):
        needs = "Triton" if kind == "cuda" else "a C++ compiler"
        _warn_once(
            f"{switch}:{kind}",
            f"{switch}=True but torch.compile's inductor backend has no {needs} on {kind}; running the backbone eagerly",
        )
        return False
    compile_kwargs.setdefault("dynamic", True)
    backbone.compile(**compile_kwargs)
    return True


def _training_device(args: object | None, model: nn.Module) -> torch.device:
    """Where the Trainer will run `model`: the config's device (CUDA unless `use_cpu`), else the model's."""
    if args is not None and hasattr(args, "use_cpu"):
        if args.use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return args.device
    return torch.device("cuda") if torch.cuda.is_available() else _device(model)


def apply_padding_free(model: nn.Module, setting: object = "auto", args: object | None = None) -> bool:
    """Resolve the `padding_free` switch (`auto` / `true` / `false`) for `model` and set it; logs the choice once.

    `args` (a `RetrieverConfig`) tells the device and the precision; without it the model's own are used.
    """
    from ark_hf.models.packing import resolve_padding_free

    if not hasattr(model, "padding_free"):
        return False
    backbone = getattr(model, "model", model)
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in _backbone(model).parameters())
    if args is not None:
        half = half or bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    on, why = resolve_padding_free(setting, backbone, device=_training_device(args, model), half_precision=half)
    if on != bool(model.padding_free):
        model.padding_free = on
    key = f"padding_free:{why}"
    if key not in _warned:  # once per decision; on a GPU it is worth a line in the console
        _warned.add(key)
        (logger.warning if torch.device(_training_device(args, model)).type == "cuda" else logger.info)(why)
    return on


def apply_kernel_switches(
    model: nn.Module,
    args: object | None = None,
    *,
    liger_kernel: bool = False,
    compile_backbone: bool = False,
    padding_free: object | None = None,
) -> dict[str, bool]:
    """Apply the config's speed switches (`padding_free`, `liger_kernel`, `compile_backbone`) to an ark_hf model.

    The trainers call this on every model, the one a config builds and one passed in by the user alike, so a
    switch reaches the model the same way whoever built it.

    Args:
        model: an ark_hf model (`BGEM3Model`, `DecoderEmbedder`) or a transformers backbone.
        args: a `RetrieverConfig` (its `padding_free` / `liger_kernel` / `compile_backbone` fields); or pass the
            flags (`padding_free=None` leaves the model's switch as it is).

    Returns:
        Which switches took effect, e.g. `{"padding_free": True, "liger_kernel": False, "compile_backbone": True}`.
    """
    if args is not None:
        liger_kernel = bool(getattr(args, "liger_kernel", False))
        compile_backbone = bool(getattr(args, "compile_backbone", False))
        padding_free = getattr(args, "padding_free", padding_free)
    applied = {}
    if padding_free is not None and hasattr(model, "padding_free"):
        applied["padding_free"] = apply_padding_free(model, padding_free, args)
    if liger_kernel and compile_backbone and inductor_available(_compile_device(model)):
        # dynamo cannot trace liger's Triton autograd functions (training crashed in LigerRMSNormFunction under
        # torch.compile on an H100); inductor generates fused kernels for the same norm, SwiGLU and RoPE ops
        _warn_once(
            "liger_kernel:compile_backbone",
            "liger_kernel=True with compile_backbone=True: torch.compile cannot trace liger-kernel's Triton autograd "
            "functions; the backbone is compiled with its plain modules (inductor fuses the same RMSNorm, SwiGLU and "
            "RoPE ops). Set one of the two to choose",
        )
        applied["liger_kernel"], liger_kernel = False, False
    if liger_kernel:
        applied["liger_kernel"] = apply_liger_kernel(model)
    if compile_backbone:
        applied["compile_backbone"] = apply_torch_compile(model)
    return applied
