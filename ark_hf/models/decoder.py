"""A decoder-only LLM as a text embedder, the Qwen3-Embedding way.

Recipe (Zhang et al., "Qwen3 Embedding: Advancing Text Embedding and Reranking Through Foundation Models",
arXiv 2506.05176, and the released code):

- a query is written `Instruct: {task}\\nQuery:{query}` (no space after `Query:`); documents get no
  instruction;
- the end-of-text token `<|endoftext|>` is appended to every text, and the embedding is the last layer's
  hidden state at that token: with causal attention it is the only position that has seen the whole text;
- embeddings are L2-normalised, so cosine similarity is a dot product;
- Matryoshka (MRL): the first `dim` coordinates, renormalised, are an embedding of their own.

`DecoderEmbedder` holds the backbone (`AutoModel`: `Qwen3Model` for a Qwen3 checkpoint, also when the folder
holds a `Qwen3ForCausalLM`), optionally wrapped with LoRA adapters by `peft`, and the tokenizer. A full save
writes the sentence-transformers layout, so the trained model is used with

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("out/final")
query_embeddings = model.encode(queries, prompt_name="query")
document_embeddings = model.encode(documents)
```

and gives the embeddings of training time.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging

from ark_hf.constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_SUBFOLDER,
    DEFAULT_INSTRUCTION,
    QWEN_EOS_TOKEN,
    QWEN_QUERY_FORMAT,
)
from ark_hf.models.checks import check_checkpoint_matches, check_tokenizer, check_weight_files
from ark_hf.models.outputs import EmbeddingOutput, RetrieverModule, truncate_embeddings
from ark_hf.models.packing import PackedBatch, PaddingFreeMixin
from ark_hf.models.st_layout import write_sentence_transformers_layout
from ark_hf.models.tokenization import TextTokenizer

logger = logging.get_logger(__name__)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DecoderEmbedder",
    "format_query",
    "last_token_pool",
    "query_prompt",
    "truncate_embeddings",
]


# ------------------------------------------------------------------------------------------- pure functions
def format_query(query: str, instruction: str | None) -> str:
    """`Instruct: {instruction}\\nQuery:{query}`; the query unchanged when there is no instruction.

    No space after `Query:` (Qwen3-Embedding's `get_detailed_instruct`). `None` and `""` mean "no
    instruction": the text is never prefixed with the string `"None"`.
    """
    if not instruction:
        return query
    return f"{query_prompt(instruction)}{query}"


def query_prompt(instruction: str) -> str:
    """The prefix that `format_query` puts before a query: sentence-transformers' `prompts["query"]`."""
    return QWEN_QUERY_FORMAT.format(instruction, "")


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last position whose attention mask is 1, for left or right padding.

    `fliplr(mask).argmax` finds the first 1 from the right, so the index is `L - 1 - argmax`. Reading the
    position from the mask, not from token ids, matters: in Qwen3 the pad id *is* the EOS id, and
    `mask.sum() - 1` is only right for right padding.

    Args:
        hidden_states: `[N, L, d]`.
        attention_mask: `[N, L]`, 1 for real tokens.

    Returns:
        `[N, d]`.
    """
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(1).to(torch.int32).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


def move_padding_right(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row so that its tokens come first and its padding last (rows already right-padded unchanged).

    A causal decoder must never see a left-padded batch in a differentiated forward pass: the query rows of the
    leading pad positions may attend to no key at all (causal mask AND padding mask is all False there). Fused
    attention kernels (CUDA's memory-efficient and cuDNN SDPA) return 0 for such a row in the forward pass but
    recompute its probabilities in the backward pass as `exp(s - logsumexp(s))` with `logsumexp = -inf`, which
    is NaN; the NaN reaches every weight gradient through the pad rows (0 * NaN = NaN), so the loss is finite
    and the weights turn NaN one step later. Right padding gives every pad row the text before it to attend to.
    The text's own attention is unchanged (RoPE scores depend on relative positions only), so the embeddings
    equal the left-padded forward's up to rounding.

    Done on the device with one gather, no host synchronisation. Needs each row's tokens to be contiguous, as
    tokenizers produce them.
    """
    length = attention_mask.shape[1]
    leading_pads = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)
    index = (torch.arange(length, device=attention_mask.device).unsqueeze(0) + leading_pads) % length
    return input_ids.gather(1, index), attention_mask.gather(1, index)


def resolve_eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token appended to every text: `<|endoftext|>` when the vocabulary has it, else the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    if QWEN_EOS_TOKEN in vocab:
        return vocab[QWEN_EOS_TOKEN]
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither {QWEN_EOS_TOKEN} nor an eos token; last-token pooling needs a "
            "token that closes every text"
        )
    return tokenizer.eos_token_id


def _load_checked_tokenizer(
    name: str, tokenizer: str | os.PathLike | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase:
    """The tokenizer (the model folder's unless named), refused before the weights load when it cannot be the
    model's (see `ark_hf.models.checks.check_tokenizer`)."""
    from transformers import AutoConfig

    source = str(tokenizer) if tokenizer is not None else name
    loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    vocab_size = getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "vocab_size", None)
    check_tokenizer(loaded, vocab_size=vocab_size, folder=source if os.path.isdir(source) else None)
    return loaded


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------------------------------- model
class DecoderEmbedder(PaddingFreeMixin, RetrieverModule):
    """A decoder LLM turned into an embedder: EOS appended, last-token pooling, L2 normalisation, optional LoRA.

    Args:
        model_name_or_path: Hub name or local folder of the backbone (loaded with `AutoModel`, so a causal-LM
            checkpoint gives its base model), or an already loaded `PreTrainedModel` / `peft.PeftModel`. Use
            `DecoderEmbedder.from_pretrained` for a folder written by `save_pretrained` with LoRA adapters.
        tokenizer: a tokenizer or its name/folder; default: the one of `model_name_or_path`. Its
            `padding_side` is respected (Qwen3-Embedding ships `left`; pooling works for both).
        torch_dtype, attn_implementation, trust_remote_code: passed to `AutoModel.from_pretrained`.
        lora: wrap the backbone with LoRA adapters (`peft`); only the adapters are trained.
        lora_r, lora_alpha, lora_dropout: rank, scaling numerator (update scale `alpha / r`) and dropout.
        lora_target_modules: module names, or `"all-linear"` for every linear projection (attention and MLP).
        normalize: L2-normalise the embeddings (Qwen3-Embedding does; cosine = dot product).
        matryoshka_dims: embedding sizes trained with the Matryoshka loss (each in `[1, hidden_size]`). The
            model still returns full-size embeddings; `truncate_embeddings` gives the views.
        padding_free: run the backbone on the batch's real tokens only, all texts packed into one sequence
            with per-text positions and causal attention within each text (`ark_hf.models.packing`); same
            embeddings as the padded forward. The varlen kernel needs CUDA and bf16/fp16; elsewhere attention
            falls back to an exact per-text SDPA (one warning).
            `"auto"` decides from the weights' device and dtype now; a trainer sets the switch from its config's
            `padding_free` (default `auto`: on with CUDA and bf16/fp16) on whatever model it is given.

    Attributes:
        model: the backbone, a `peft.PeftModel` when LoRA is on.
        backbone: the transformers model itself (under the peft wrapper when LoRA is on).
        tokenizer: the tokenizer.
        eos_token_id: the id appended to every text.
    """

    supports_gradient_checkpointing = True
    _no_split_modules = property(lambda self: list(getattr(self.backbone, "_no_split_modules", None) or []))  # FSDP

    def __init__(
        self,
        model_name_or_path: str | os.PathLike | PreTrainedModel | nn.Module,
        *,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        lora: bool = False,
        lora_r: int = 8,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = "all-linear",
        normalize: bool = True,
        matryoshka_dims: list[int] | None = None,
        trust_remote_code: bool = False,
        padding_free: bool | str = False,
    ) -> None:
        super().__init__()
        if isinstance(model_name_or_path, (str, os.PathLike)):
            name = str(model_name_or_path)
            if os.path.isfile(os.path.join(name, ADAPTER_CONFIG_NAME)):
                raise ValueError(
                    f"{name} holds LoRA adapters, not a model; load it with DecoderEmbedder.from_pretrained({name!r})"
                )
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):  # checked before any weights load
                tokenizer = _load_checked_tokenizer(name, tokenizer, trust_remote_code)
            check_weight_files(name)  # truncated safetensors: named here, not deep inside safetensors
            load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if torch_dtype is not None:
                load_kwargs["dtype"] = torch_dtype
            if attn_implementation is not None:
                load_kwargs["attn_implementation"] = attn_implementation
            backbone = AutoModel.from_pretrained(name, **load_kwargs)
        else:
            backbone = model_name_or_path
            name = backbone.config.name_or_path
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(
                str(tokenizer) if tokenizer is not None else name, trust_remote_code=trust_remote_code
            )
        self.name_or_path = name
        self.tokenizer = tokenizer
        self.eos_token_id = resolve_eos_token_id(tokenizer)
        if tokenizer.pad_token_id is None:
            # padded positions are masked out, so any id works; the EOS is what Qwen3 itself uses
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(self.eos_token_id)

        if lora:
            if _is_peft_model(backbone):
                raise ValueError(
                    "the backbone already carries peft adapters; pass lora=False to train them as they are"
                )
            from peft import LoraConfig, TaskType, get_peft_model

            lora_config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=lora_target_modules,
                task_type=TaskType.FEATURE_EXTRACTION,
            )
            backbone = get_peft_model(backbone, lora_config)
        self.model = backbone
        self.normalize = normalize

        hidden_size = self.config.hidden_size
        if matryoshka_dims is not None:
            matryoshka_dims = [int(dim) for dim in matryoshka_dims]
            bad = [dim for dim in matryoshka_dims if not 0 < dim <= hidden_size]
            if bad:
                raise ValueError(f"matryoshka_dims must lie in [1, {hidden_size}] (the hidden size), got {bad}")
        self.matryoshka_dims = matryoshka_dims
        self.padding_free = padding_free

    # ----------------------------------------------------------------------------------------- properties
    @property
    def config(self) -> PretrainedConfig:
        """The backbone's config (the Trainer and DeepSpeed read `hidden_size` and friends from it)."""
        return self.backbone.config

    @property
    def backbone(self) -> PreTrainedModel:
        """The transformers model under the peft wrapper (the backbone itself without LoRA)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def is_lora(self) -> bool:
        return _is_peft_model(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    format_query = staticmethod(format_query)
    truncate_embeddings = staticmethod(truncate_embeddings)

    # ----------------------------------------------------------------------------------------- training
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the backbone's layers; non-reentrant by default.

        Reentrant checkpointing breaks when one step runs the backbone twice (queries, then passages) under
        DDP, and with frozen inputs (LoRA) it would not backpropagate at all.
        """
        kwargs = (
            {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        )
        backbone = self.backbone
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        else:  # transformers before the rename
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        backbone.config.use_cache = False
        if self.is_lora:
            # the frozen embedding output must require grad, or checkpointed layers see no graph to the adapters
            backbone.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Alias of `activation_checkpointing_enable` (the name transformers < 5.x and sentence-transformers use)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        backbone = self.backbone
        if hasattr(backbone, "activation_checkpointing_disable"):
            backbone.activation_checkpointing_disable()
        else:
            backbone.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        backbone = self.backbone
        if hasattr(backbone, "is_activation_checkpointing"):
            return bool(backbone.is_activation_checkpointing)
        return bool(getattr(backbone, "is_gradient_checkpointing", False))

    def enable_input_require_grads(self) -> None:
        self.backbone.enable_input_require_grads()

    # ----------------------------------------------------------------------------------------- encoding
    def tokenize(self, texts: list[str], max_length: int, pad_to_multiple_of: int | None = None) -> BatchEncoding:
        """Tokenize without special tokens, cut to `max_length - 1` tokens, append the EOS, pad.

        Appending after truncation is what keeps the EOS in long texts (the pooled position). Padding follows
        `tokenizer.padding_side`.
        """
        return self.text_tokenizer()(texts, max_length, pad_to_multiple_of)

    def text_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None = None) -> TextTokenizer:
        """No special tokens, truncation to `max_length - 1`, then the EOS that last-token pooling reads."""
        return TextTokenizer(tokenizer if tokenizer is not None else self.tokenizer, self.eos_token_id)

    def encode_features(self, features: dict[str, torch.Tensor]) -> EmbeddingOutput:
        """Backbone + last-token pooling (+ normalisation) on tokenized texts.

        The pooled vectors are upcast to float32 before normalising: with bf16 weights the contrastive
        scores (dot products divided by a small temperature) would otherwise keep only ~3 significant digits.
        """
        if self.padding_free:
            return self.encode_packed([features])[0]
        input_ids, attention_mask = move_padding_right(features["input_ids"], features["attention_mask"])
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True
        ).last_hidden_state
        return self._pooled(last_token_pool(hidden, attention_mask))

    packed_call_kwargs = {"use_cache": False}

    def packed_outputs(self, features: dict[str, Any], packed: PackedBatch, hidden: torch.Tensor) -> EmbeddingOutput:
        """Last-token pooling on one batch's packed hidden states (`[T, d]`)."""
        return self._pooled(packed.pool(hidden, "last_token"))

    def _pooled(self, pooled: torch.Tensor) -> EmbeddingOutput:
        dense = pooled.float()
        if self.normalize:
            dense = F.normalize(dense, p=2, dim=-1)
        return EmbeddingOutput(dense=dense)

    @torch.no_grad()
    def encode(
        self,
        texts: str | list[str],
        *,
        prompt: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        convert_to_tensor: bool = False,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Embed texts for inference (eval mode, no gradients, batched by length).

        Args:
            texts: a text or a list of texts.
            prompt: the task instruction for queries: each text becomes `Instruct: {prompt}\\nQuery:{text}`.
                Leave it `None` for documents.
            batch_size: texts per forward pass.
            max_length: tokens per text, EOS included.
            convert_to_tensor: return a `torch.Tensor` on the model's device instead of a float32 numpy array.
            truncate_dim: Matryoshka size to return (sliced and renormalised).
            show_progress_bar: show a tqdm bar over batches.

        Returns:
            `[N, d]` embeddings (`[d]` for a single string).
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        formatted = [format_query(text, prompt) for text in texts]
        # longest first: batches of similar length waste little padding
        order = sorted(range(len(formatted)), key=lambda i: -len(formatted[i]))
        was_training = self.training
        self.eval()
        device = self.device
        chunks = []
        starts = range(0, len(order), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Encoding", unit="batch")
        try:
            for start in starts:
                batch = [formatted[i] for i in order[start : start + batch_size]]
                features = {key: value.to(device) for key, value in self.tokenize(batch, max_length).items()}
                chunks.append(self.encode_features(features).dense)
        finally:
            self.train(was_training)
        hidden_size = self.config.hidden_size
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, hidden_size, device=device)
        embeddings = embeddings[torch.as_tensor(np.argsort(order), dtype=torch.long, device=embeddings.device)]
        if truncate_dim is not None:
            embeddings = truncate_embeddings(embeddings, truncate_dim, normalize=self.normalize)
        if single:
            embeddings = embeddings[0]
        return embeddings if convert_to_tensor else embeddings.cpu().numpy()

    # ----------------------------------------------------------------------------------------- LoRA
    def merge_lora(self) -> DecoderEmbedder:
        """Fold the adapters into the backbone weights, in place (then train or save it as a plain model)."""
        if not self.is_lora:
            raise ValueError("merge_lora: this model has no LoRA adapters")
        self.model = self.model.merge_and_unload()
        return self

    def _merged_state_dict(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """The backbone's weights with every LoRA update `W + (alpha / r) B A` folded in, without touching the model.

        Each merged tensor is built in float32 and moved to the CPU, so the extra accelerator memory is one
        layer, not a second copy of the model (`merge_and_unload` on a deep copy would need the latter).
        `state_dict` (keys of this module, e.g. gathered by DeepSpeed ZeRO-3) replaces the live weights.
        Returns None for adapters this does not cover (DoRA and other LoRA variants, LoRA on embeddings,
        `modules_to_save`): the caller then falls back to peft's own merge.
        """
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        if state_dict is None:
            source = self.model.state_dict()
        else:
            source = {key.removeprefix("model."): value for key, value in state_dict.items()}
        if any("modules_to_save" in key or "original_module" in key for key in source):
            return None
        lora_layers = {
            name: module
            for name, module in self.model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)
        }
        for module in lora_layers.values():
            if not isinstance(module, LoraLinear) or any(module.lora_variant.values()):
                return None
            if any(module.lora_bias.values()):
                return None

        merged: dict[str, torch.Tensor] = {}
        for key, tensor in source.items():
            name = key.removeprefix(prefix)
            if ".lora_" in name:
                continue
            merged[name.replace(".base_layer.", ".")] = tensor
        for name, module in lora_layers.items():
            weight_key = f"{name}.weight"
            weight = merged[weight_key]
            update = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for adapter in module.active_adapters:
                if adapter not in module.lora_A or adapter in module.merged_adapters:
                    continue
                lora_a = source[f"{prefix}{name}.lora_A.{adapter}.weight"].to(weight.device, torch.float32)
                lora_b = source[f"{prefix}{name}.lora_B.{adapter}.weight"].to(weight.device, torch.float32)
                delta = (lora_b @ lora_a) * module.scaling[adapter]
                update += delta.T if module.fan_in_fan_out else delta
            merged[weight_key] = (weight.float() + update).to(weight.dtype).cpu()
        return merged

    # ----------------------------------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        output_dir: str | os.PathLike,
        *,
        merge_lora: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_seq_length: int | None = None,
        query_instruction: str | None = DEFAULT_INSTRUCTION,
    ) -> None:
        """Save the model so that `from_pretrained` and (full saves) `SentenceTransformer` load it.

        Full save (no LoRA, or `merge_lora=True`): backbone weights (LoRA folded in, the training model left
        untouched), `config.json`, the tokenizer, and the sentence-transformers files (`modules.json`:
        Transformer -> Pooling(lasttoken) -> Normalize, `sentence_bert_config.json`, `1_Pooling/config.json`,
        `config_sentence_transformers.json` with the `query`/`document` prompts). A LoRA model also keeps
        its adapter in `lora_adapter/`, so the folder can resume LoRA training.

        Adapter save (LoRA and `merge_lora=False`): `adapter_config.json`, `adapter_model.safetensors` and
        the tokenizer; small, and reloaded on top of the base model named in `adapter_config.json`.

        The saved tokenizer appends the EOS itself (a `TemplateProcessing` post-processor, as Qwen3-Embedding's
        does), because sentence-transformers tokenizes with special tokens and pools the last one.

        Args:
            output_dir: folder to write (created if needed).
            merge_lora: with LoRA, write merged full weights (True) or only the adapter (False).
            state_dict: weights to save instead of the live ones (keys of this module, as the Trainer passes
                them under DeepSpeed ZeRO-3 / FSDP).
            max_seq_length: sentence-transformers' truncation length (EOS included); default: the tokenizer's
                `model_max_length`, capped at the backbone's `max_position_embeddings`.
            query_instruction: the instruction of sentence-transformers' `query` prompt.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if max_seq_length is None:
            max_seq_length = min(
                self.tokenizer.model_max_length, getattr(self.config, "max_position_embeddings", 1 << 31)
            )
        if self.is_lora:
            self._save_adapter(output_dir if not merge_lora else output_dir / ADAPTER_SUBFOLDER, state_dict)
            if not merge_lora:
                self._save_tokenizer(output_dir, max_seq_length)
                return
            merged = self._merged_state_dict(state_dict)
            if merged is not None:
                self.model.get_base_model().save_pretrained(output_dir, state_dict=merged)
            elif state_dict is not None:
                raise ValueError(
                    "cannot merge these adapters from a given state_dict (LoRA variant, embedding LoRA or "
                    "modules_to_save); save with merge_lora=False and merge the adapter folder afterwards"
                )
            else:
                logger.warning(
                    "Merging a LoRA variant through a copy of the model: this needs memory for a second model"
                )
                copy.deepcopy(self.model).merge_and_unload().save_pretrained(output_dir)
            for stale in (ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin"):
                if (output_dir / stale).is_file():
                    (output_dir / stale).unlink()
        else:
            backbone_state = (
                {key.removeprefix("model."): value for key, value in state_dict.items()}
                if state_dict is not None
                else None
            )
            self.model.save_pretrained(output_dir, state_dict=backbone_state)
        self._save_tokenizer(output_dir, max_seq_length)
        write_sentence_transformers_layout(
            output_dir,
            hidden_size=self.config.hidden_size,
            pooling_mode="lasttoken",
            normalize=self.normalize,
            max_seq_length=max_seq_length,
            prompts={"query": query_prompt(query_instruction) if query_instruction else "", "document": ""},
        )

    def _save_adapter(self, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        kwargs: dict[str, Any] = {}
        if state_dict is not None:
            kwargs["state_dict"] = {key.removeprefix("model."): value for key, value in state_dict.items()}
        self.model.save_pretrained(str(folder), **kwargs)

    def _save_tokenizer(self, output_dir: Path, max_seq_length: int) -> None:
        """Save the tokenizer with an EOS-appending post-processor and `model_max_length = max_seq_length`.

        Set on the live tokenizer only for the duration of the save: training tokenizes without special
        tokens and appends the EOS itself, so the post-processor is for the readers of the folder.
        """
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        original_max_length = tokenizer.model_max_length
        original_processor = backend.post_processor if backend is not None else None
        try:
            tokenizer.model_max_length = max_seq_length
            if backend is None:
                logger.warning(
                    "%s is not a fast tokenizer: the saved tokenizer will not append the EOS, and "
                    "sentence-transformers embeddings will differ from training",
                    type(tokenizer).__name__,
                )
            elif not self._appends_eos(tokenizer):
                backend.post_processor = self._eos_post_processor(original_processor)
            tokenizer.save_pretrained(str(output_dir))
        finally:
            tokenizer.model_max_length = original_max_length
            if backend is not None:
                backend.post_processor = original_processor
        if getattr(self, "_saved_tokenizer_checked", False):
            return  # the reload check depends on the tokenizer only: once per model (a Qwen3 reload costs seconds)
        saved = AutoTokenizer.from_pretrained(str(output_dir))
        self._saved_tokenizer_checked = True
        if not self._appends_eos(saved):
            logger.warning(
                "The tokenizer saved in %s does not append token %d when reloaded (%s rebuilds its post-processor); "
                "sentence-transformers embeddings will differ from training",
                output_dir,
                self.eos_token_id,
                type(saved).__name__,
            )

    def _appends_eos(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        probe = "Query:probe"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        return tokenizer(probe)["input_ids"] == plain + [self.eos_token_id]

    def _eos_post_processor(self, current: Any) -> Any:
        from tokenizers import processors

        eos = self.tokenizer.convert_ids_to_tokens(self.eos_token_id)
        template = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, self.eos_token_id)]
        )
        # ByteLevel only fixes offsets; any other processor (BOS templates...) adds tokens training never saw
        if isinstance(current, processors.ByteLevel):
            return processors.Sequence([current, template])
        return template

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        base_model: str | os.PathLike | PreTrainedModel | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> DecoderEmbedder:
        """Load a folder written by `save_pretrained` (or any backbone folder / Hub name).

        A folder with `adapter_config.json` is an adapter: the base model comes from `base_model`, else from
        the config's `base_model_name_or_path`, and the adapter is loaded on top (`is_trainable=True` to keep
        training it). Other keyword arguments go to `DecoderEmbedder(...)`.
        """
        path = str(path)
        adapter_config_file = os.path.join(path, ADAPTER_CONFIG_NAME)
        if not os.path.isfile(adapter_config_file):
            if base_model is not None:
                raise ValueError(f"{path} is a full model; base_model is only for adapter folders")
            return cls(path, **kwargs)
        if kwargs.get("lora"):
            raise ValueError(f"{path} already holds LoRA adapters; do not pass lora=True")
        from peft import PeftModel

        if base_model is None:
            with open(adapter_config_file, encoding="utf-8") as handle:
                base_model = json.load(handle).get("base_model_name_or_path")
            if not base_model:
                raise ValueError(f"{adapter_config_file} names no base_model_name_or_path; pass base_model=")
        if isinstance(base_model, (str, os.PathLike)):
            load_kwargs: dict[str, Any] = {"trust_remote_code": kwargs.get("trust_remote_code", False)}
            if kwargs.get("torch_dtype") is not None:
                load_kwargs["dtype"] = kwargs["torch_dtype"]
            if kwargs.get("attn_implementation") is not None:
                load_kwargs["attn_implementation"] = kwargs["attn_implementation"]
            base_model = AutoModel.from_pretrained(str(base_model), **load_kwargs)
        peft_model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
        kwargs = {key: value for key, value in kwargs.items() if key not in ("torch_dtype", "attn_implementation")}
        has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
        kwargs.setdefault("tokenizer", path if has_tokenizer else base_model.config.name_or_path)
        return cls(peft_model, **kwargs)

    def load_weights_from(self, path: str | os.PathLike) -> None:
        """Restore weights in place from a folder written by `save_pretrained` (the Trainer's resume path).

        A LoRA model reads the adapter (the folder itself or its `lora_adapter/`); a plain model reads the
        full weights, and every tensor must match.
        """
        from ark_hf.merging import load_checkpoint_weights

        path = Path(path)
        check_checkpoint_matches(path, self.config)  # another model's checkpoint: named, before any load
        if self.is_lora:
            from peft import set_peft_model_state_dict

            folder = path if (path / ADAPTER_CONFIG_NAME).is_file() else path / ADAPTER_SUBFOLDER
            if not (folder / ADAPTER_CONFIG_NAME).is_file():
                raise FileNotFoundError(f"{path}: no LoRA adapter ({ADAPTER_CONFIG_NAME} or {ADAPTER_SUBFOLDER}/)")
            result = set_peft_model_state_dict(self.model, load_checkpoint_weights(folder))
            missing = [key for key in result.missing_keys if "lora_" in key]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{folder}: adapter mismatch, missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                )
            return
        if (path / ADAPTER_CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds LoRA adapters but this model has none")
        result = self.model.load_state_dict(load_checkpoint_weights(path), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{path}: weights do not match the model, missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
