"""Model cards and Hub pushes for models trained with ark_hf.

`write_model_card(trainer, output_dir)` writes `README.md` (a `huggingface_hub.ModelCard` from the template below)
and, when matplotlib is installed, `training_plot.png` into a saved model folder:

- metadata: `library_name: sentence-transformers`, `base_model` (a Hub name only), tags, `pipeline_tag`;
- base model (its Hub name, or a local folder's name: never a local path), training data (sources and record
  counts), evaluation sets (sizes);
- the objective and its settings, and every hyperparameter that differs from the config's defaults;
- the evaluation table: one row per (step, scoring mode), the metrics exactly as the trainer logged them;
- usage for FlagEmbedding (BGE-M3 models, with the saved `pooling_method`), sentence-transformers and ark_hf;
- citations: BGE-M3 or Qwen3-Embedding, and ARK when the run used ARK's alignment (`AlignmentCallback`).

What the card states is also kept in `model_card_data.json`. Rewriting the card of a saved folder without the
trainer (`ark-hf card`) merges with it and with the existing card's metadata, so nothing recorded is lost: the
data sizes, the evaluation sets, and the evaluation rows (also when `trainer_state.json` is absent).

`check_hub_push(args)` tells before training, in one line, why a push would fail (offline, no token, no repo
id); `upload_file_list(output_dir)` lists exactly the files that `Trainer.push_to_hub` uploads from a folder.

```python
from ark_hf.hub import write_model_card
write_model_card(trainer, "out/m3")   # or: ark-hf card out/m3
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["HubPushError", "check_hub_push", "eval_table_rows", "upload_file_list", "write_model_card"]

PLOT_FILE = "training_plot.png"
CARD_DATA_FILE = "model_card_data.json"
# what `Trainer.push_to_hub` passes to `upload_folder` (huggingface_hub adds its DEFAULT_IGNORE_PATTERNS)
TRAINER_IGNORE_PATTERNS = ["_*", "checkpoint-*"]
# keys that describe where a run writes or logs, not how it trains
_NOT_HYPERPARAMETERS = {
    "output_dir", "logging_dir", "run_name", "hub_token", "hub_model_id", "push_to_hub", "overwrite_output_dir",
    "train_data", "eval_data", "model_name_or_path", "resume_from_checkpoint", "report_to", "disable_tqdm",
    "use_cpu", "deepspeed", "local_rank", "trackio_space_id", "project", "hub_private_repo", "logging_steps",
    "dataloader_num_workers",  # where batches are tokenized, not what trains (resolved per machine from auto)
}  # fmt: skip
_OBJECTIVE_KEYS = (
    "unified_finetuning", "heads", "use_self_distill", "self_distill_start_step", "loss_preset", "temperature",
    "train_group_size", "in_batch_negatives", "negatives_cross_device", "knowledge_distillation", "kd_loss_type",
    "teacher_model", "teacher_temperature", "fix_encoder", "sentence_pooling_method", "false_negative_margin",
    "matryoshka_dims", "use_lora", "lora_r", "query_instruction",
)  # fmt: skip

CITATIONS = {
    "bge-m3": """@misc{chen2024bgem3,
  title={BGE M3-Embedding: Multi-Lingual, Multi-Functionality, Multi-Granularity Text Embeddings Through Self-Knowledge Distillation},
  author={Jianlv Chen and Shitao Xiao and Peitian Zhang and Kun Luo and Defu Lian and Zheng Liu},
  year={2024},
  eprint={2402.03216},
  archivePrefix={arXiv},
  primaryClass={cs.CL}
}""",
    "qwen3-embedding": """@article{zhang2025qwen3embedding,
  title={Qwen3 Embedding: Advancing Text Embedding and Reranking Through Foundation Models},
  author={Zhang, Yanzhao and Li, Mingxin and Long, Dingkun and Zhang, Xin and Lin, Huan and Yang, Baosong and Xie, Pengjun and Yang, An and Liu, Dayiheng and Lin, Junyang and Huang, Fei and Zhou, Jingren},
  journal={arXiv preprint arXiv:2506.05176},
  year={2025}
}""",
    "ark": """@misc{zhou2025ark,
  title={ARK: Answer-Centric Retriever Tuning via KG-augmented Curriculum Learning},
  author={Zhou and Ding and Jiang},
  year={2025},
  eprint={2511.16326},
  archivePrefix={arXiv}
}""",
}

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A {{ model_kind }} fine-tuned with ark_hf from {{ base_model_text }}.

## Model

- Base model: {{ base_model_text }}
- Architecture: {{ architecture }}
- Dense pooling: `{{ pooling }}`{% if normalize %}, L2-normalised (cosine similarity){% endif %}
{%- if heads %}
- Heads: dense, sparse (lexical weights) and ColBERT (multi-vector){% if not heads_trained %}; the sparse and ColBERT heads were not trained{% endif %}
{%- endif %}
{%- if pooling_note %}

> **Pooling.** {{ pooling_note }}
{%- endif %}

## Training data

{% for row in train_sources -%}
- `{{ row.source }}`: {{ row.records }} records
{% endfor -%}
{% if not train_sources %}- (not recorded)
{% endif %}
{%- if eval_sets %}
Evaluation sets:
{% for row in eval_sets -%}
- {{ row.name }}: {{ row.queries }} queries, {{ row.corpus }} documents; modes {{ row.modes }}
{% endfor -%}
{%- endif %}

## Objective

{{ objective }}

| setting | value |
|---|---|
{% for key, value in objective_settings -%}
| `{{ key }}` | `{{ value }}` |
{% endfor %}
## Hyperparameters (those that differ from the defaults)

| hyperparameter | value |
|---|---|
{% for key, value in hyperparameters -%}
| `{{ key }}` | `{{ value }}` |
{% endfor %}
{%- if eval_table %}
## Evaluation

Metrics logged by the trainer's evaluator, per scoring mode{% if eval_name %} (`{{ eval_name }}`){% endif %}:

{{ eval_table }}
{%- endif %}
{%- if plot_file %}

![Training loss components and evaluation metrics]({{ plot_file }})
{%- endif %}

## Usage
{% if heads is not none %}
### FlagEmbedding

```python
from FlagEmbedding import BGEM3FlagModel

model = BGEM3FlagModel("{{ model_id }}", pooling_method="{{ pooling }}", use_fp16=False)
sentences = ["How do I renew a building permit?", "Building permits are renewed online before they expire."]
output = model.encode(sentences, return_dense=True, return_sparse={{ heads }}, return_colbert_vecs={{ heads }})
dense = output["dense_vecs"]
```
{% endif %}
### sentence-transformers

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{{ model_id }}")
sentences = ["How do I renew a building permit?", "Building permits are renewed online before they expire."]
dense = model.encode(sentences)
similarity = model.similarity(dense, dense)
```

### ark_hf

```python
from ark_hf import {{ ark_class }}

model = {{ ark_class }}.from_pretrained("{{ model_id }}"{{ ark_load_kwargs }})
sentences = ["How do I renew a building permit?", "Building permits are renewed online before they expire."]
{{ ark_encode }}
```

## Framework versions

{% for name, version in versions -%}
- {{ name }}: {{ version }}
{% endfor %}
## Citation

{% for citation in citations -%}
```bibtex
{{ citation }}
```

{% endfor -%}
"""


class HubPushError(ValueError):
    """`push_to_hub` is set but the upload cannot succeed (offline, not logged in, no repository id)."""


def check_hub_push(args: Any) -> None:
    """Raise `HubPushError` with one line saying why a push would fail; nothing when `push_to_hub` is off.

    Checked before training: `HF_HUB_OFFLINE`, a token (`hub_token`, `HF_TOKEN` or `hf auth login`), and that
    the repository id is a valid Hub name. It needs no network, so it cannot tell a revoked token from a good one.
    """
    if not getattr(args, "push_to_hub", False):
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubPushError(
            "push_to_hub is set but HF_HUB_OFFLINE=1: the upload would fail; unset it or drop push_to_hub"
        )
    if not (getattr(args, "hub_token", None) or get_token()):
        raise HubPushError(
            "push_to_hub is set but no Hugging Face token was found: run `hf auth login`, set HF_TOKEN or hub_token"
        )
    repo = getattr(args, "hub_model_id", None) or Path(args.output_dir).absolute().name
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]{1,96}", repo) or repo.startswith(("-", ".")) or ".." in repo:
        raise HubPushError(f"push_to_hub: {repo!r} is not a valid Hub repository id; set hub_model_id='user/name'")


def upload_file_list(
    output_dir: str | os.PathLike, ignore_patterns: Sequence[str] = TRAINER_IGNORE_PATTERNS
) -> list[str]:
    """The files (relative paths, sorted) that `Trainer.push_to_hub` uploads from `output_dir`.

    The same filter as `HfApi.upload_folder`: every file under the folder, minus `ignore_patterns` and
    huggingface_hub's `DEFAULT_IGNORE_PATTERNS` (`.git`, `.cache/huggingface`).
    """
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(output_dir).expanduser().resolve()
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return sorted(filter_repo_objects(paths, ignore_patterns=list(ignore_patterns) + DEFAULT_IGNORE_PATTERNS))


def eval_table_rows(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows `{"step", "name", "mode", metric: value}` of every evaluation entry of a trainer's log history."""
    from ark_hf.evaluation.ir import METRICS, MODES

    pattern = re.compile(
        r"^eval_(?:(?P<name>.+)_)?(?P<mode>" + "|".join(re.escape(m) for m in MODES) + r")_(?P<metric>"
        + "|".join(re.escape(m) for m in METRICS) + r")$"
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    for entry in log_history:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for key, value in entry.items():
            match = pattern.match(key)
            if match:
                row = found.setdefault(
                    (match["name"] or "", match["mode"]),
                    {"step": entry.get("step", 0), "name": match["name"] or "", "mode": match["mode"]},
                )
                row[match["metric"]] = value
        order = {mode: i for i, mode in enumerate(MODES)}
        rows.extend(found[key] for key in sorted(found, key=lambda k: (k[0], order[k[1]])))
    return rows


def _markdown_eval_table(rows: list[dict[str, Any]]) -> str:
    from ark_hf.evaluation.ir import METRICS

    metrics = [m for m in METRICS if any(m in row for row in rows)]
    named = any(row["name"] for row in rows)
    header = ["step", *(["set"] if named else []), "mode", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["step"]), *([row["name"]] if named else []), row["mode"]]
        cells += [f"{row[m]:.4f}" if m in row else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(log_history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Loss components and eval nDCG@10 per mode against the step; False (logged) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: the model card has no training plot (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses: dict[str, list[tuple[int, float]]] = {}
    evals: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry:
            for key, value in entry.items():
                if (key == "loss" or key.startswith("loss_")) and isinstance(value, (int, float)):
                    losses.setdefault(key, []).append((step, value))
    for row in eval_table_rows(log_history):
        if "ndcg@10" in row:
            label = f"{row['name']} {row['mode']}".strip()
            evals.setdefault(label, []).append((row["step"], row["ndcg@10"]))
    if not losses and not evals:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series, title in ((axes[0], losses, "training loss"), (axes[1], evals, "eval nDCG@10")):
        for label, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 20 else None,
                    label=label)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        if series:
            ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _versions() -> list[tuple[str, str]]:
    import importlib.metadata

    found = []
    for name in ("ark_hf", "transformers", "torch", "sentence-transformers", "huggingface_hub"):
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _train_sources(train_dataset: Any) -> list[dict[str, Any]]:
    records = getattr(train_dataset, "records", None)
    if not records:
        return []
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record.get("source", "data"))] = counts.get(str(record.get("source", "data")), 0) + 1
    return [{"source": source, "records": n} for source, n in counts.items()]


# deprecated aliases that mirror another field (`activation_checkpointing*`): listing them would repeat it
_ALIAS_FIELDS = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}


def _resolved_defaults(args: Any) -> dict[str, Any]:
    """What `__post_init__` turns an unset field into: a field holding this value was left at its default."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    resolved: dict[str, Any] = {
        "activation_checkpointing": False,  # transformers: unset means off
        # less `use_configured_state`, which setting up the device pops from it
        "accelerator_config": {k: v for k, v in AcceleratorConfig().to_dict().items() if k != "use_configured_state"},
        "dataloader_pin_memory": not getattr(args, "use_cpu", False),  # use_cpu turns pinning off
    }
    resolved.update(getattr(type(args), "resolved_defaults", {}))
    return resolved


def _plain(value: Any) -> Any:
    """Enums as their value; None and empty strings / containers as None (`debug` is "" unset, [] resolved)."""
    value = getattr(value, "value", value)
    if isinstance(value, (str, list, tuple, dict)) and not value:
        return None
    return value


def _non_default_hyperparameters(args: Any) -> list[tuple[str, Any]]:
    # the fields' declared defaults: building a second config would reset accelerate's process state (rank 0
    # would leave the process group while the other ranks wait in the final save's barrier)
    defaults = {}
    for field in dataclasses.fields(args):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    resolved = _resolved_defaults(args)
    changed = []
    for key, value in sorted(args.to_dict().items()):
        if key in _NOT_HYPERPARAMETERS or key in _ALIAS_FIELDS or key.startswith("_") or key not in defaults:
            continue
        if _plain(value) == _plain(defaults[key]) or (key in resolved and _plain(value) == _plain(resolved[key])):
            continue
        changed.append((key, value))
    return changed


def _is_hub_name(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name) is not None


def model_display_name(name: str | os.PathLike | None) -> str | None:
    """How a card names a model: a Hub name as is; a local folder by the Hub name of the Hugging Face cache
    entry it is in (`.../models--org--name/snapshots/<hash>`), else by its own name, never by its full path."""
    if name is None:
        return None
    name = str(name)
    if _is_hub_name(name) or not (os.path.isabs(name) or os.path.exists(name) or os.sep in name):
        return name
    path = Path(name).expanduser().absolute()
    for part in reversed(path.parts):
        cached = re.fullmatch(r"models--([\w.-]+)--([\w.-]+)", part)
        if cached:
            return f"{cached[1]}/{cached[2]}"
    return path.name


def _read_card_data(output_dir: Path) -> dict[str, Any]:
    """`model_card_data.json` of a folder whose card was written before ({} when there is none)."""
    path = output_dir / CARD_DATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it to write the card from scratch") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, expected an object")
    return data


def _existing_card_metadata(output_dir: Path) -> dict[str, Any]:
    """The YAML metadata of the folder's current README.md ({} when there is none)."""
    path = output_dir / "README.md"
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    return ModelCard.load(path).data.to_dict()


def _merge_eval_rows(recorded: Sequence[Mapping[str, Any]], logged: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows of both, one per (step, set, mode); a logged row replaces the recorded one of the same key."""
    from ark_hf.evaluation.ir import MODES

    order = {mode: i for i, mode in enumerate(MODES)}
    merged = {(row["step"], row["name"], row["mode"]): dict(row) for row in recorded}
    merged.update({(row["step"], row["name"], row["mode"]): dict(row) for row in logged})
    return [merged[key] for key in sorted(merged, key=lambda k: (k[0], k[1], order.get(k[2], len(order))))]


def _used_ark_alignment(trainer: Any) -> bool:
    from ark_hf.callbacks.alignment import AlignmentCallback

    handler = getattr(trainer, "callback_handler", None)
    return any(isinstance(callback, AlignmentCallback) for callback in getattr(handler, "callbacks", []))


def write_model_card(
    trainer_or_state: Any,
    output_dir: str | os.PathLike,
    *,
    args: Any = None,
    model: Any = None,
    model_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
    plot: bool = True,
    log_pooling_note: bool = True,
    ark_alignment: bool | None = None,
) -> Path:
    """Write `README.md` (and `training_plot.png`) into a saved model folder; returns the card's path.

    Args:
        trainer_or_state: a `BaseRetrieverTrainer` (args, state, model, data and evaluators are read from it), or a
            `TrainerState` / its log history (then give `args`; the model is read from `output_dir`'s files).
        output_dir: the saved model folder (`save_model`'s output).
        args: the training config when `trainer_or_state` is not a trainer.
        model: the model when `trainer_or_state` is not a trainer (default: read the pooling from the folder).
        model_id: the name the usage snippets load (default: `hub_model_id`, else the folder's absolute path).
        model_name: the card's title (default: the folder name).
        base_model: the base model (default: `args.model_name_or_path`); a local folder is named by its Hub name
            when it is in the Hugging Face cache, else by its folder name. Only a Hub name goes into the metadata.
        datasets: Hub dataset ids for the metadata.
        language, license, tags: metadata; `tags` are added to ark_hf's.
        plot: draw `training_plot.png` when matplotlib is installed.
        log_pooling_note: log (warning) how to load a non-CLS BGE-M3 folder in FlagEmbedding; off when rewriting
            a card whose save already said so.
        ark_alignment: cite ARK (default: when the trainer has an `AlignmentCallback`, or the folder's card
            data says the run had one).

    Without a trainer, what the call does not know is taken from the folder's `model_card_data.json` and the
    existing card's metadata: the training data, evaluation sets, evaluation rows (merged with those of the
    given log history), datasets, language, license and tags. With a trainer, the trainer's run replaces them.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ark_hf.models.loading import embedder_kind

    output_dir = Path(output_dir)
    trainer = trainer_or_state if hasattr(trainer_or_state, "state") and hasattr(trainer_or_state, "args") else None
    if trainer is not None:
        args = trainer.args
        log_history = list(trainer.state.log_history)
        model = trainer.accelerator.unwrap_model(trainer.model)
        train_sources = _train_sources(trainer.train_dataset)
        evaluators = list(getattr(trainer, "evaluators", []))
    else:
        log_history = list(getattr(trainer_or_state, "log_history", trainer_or_state) or [])
        train_sources, evaluators = [], []
    if args is None:
        raise ValueError("write_model_card needs the training config: pass a trainer, or args=")
    # a trainer knows its whole run; a rewrite from the saved files keeps what the folder recorded before
    recorded = {} if trainer is not None else _read_card_data(output_dir)
    metadata = {} if trainer is not None else _existing_card_metadata(output_dir)
    if ark_alignment is None:
        ark_alignment = _used_ark_alignment(trainer) if trainer is not None else recorded.get("ark_alignment", False)

    heads_info_file = output_dir / "m3_heads.json"
    heads_info = json.loads(heads_info_file.read_text(encoding="utf-8")) if heads_info_file.is_file() else None
    is_m3 = embedder_kind(model if model is not None else output_dir) == "bge_m3"
    if is_m3:
        pooling = getattr(model, "pooling", None) or heads_info.get("pooling", "cls")
        has_heads = bool(getattr(model, "has_heads", None) if model is not None else heads_info.get("has_heads"))
        heads_trained = bool((heads_info or {}).get("heads_trained", has_heads))
        architecture = "BGE-M3 (encoder with dense, sparse and ColBERT heads)" if has_heads else "encoder, dense head"
        ark_class, kind = "BGEM3Model", "BGE-M3 retrieval embedder"
        ark_encode = (
            f"output = model.encode(sentences, return_dense=True, return_sparse={has_heads}, "
            f'return_colbert_vecs={has_heads})\ndense = output["dense_vecs"]'
        )
        citations = [CITATIONS["bge-m3"]]
    else:
        pooling, has_heads, heads_trained = "last_token", None, False
        architecture, ark_class, kind = "decoder, last-token pooling", "DecoderEmbedder", "decoder embedder"
        ark_encode = "dense = model.encode(sentences)"
        citations = [CITATIONS["qwen3-embedding"]]
    if ark_alignment:
        citations.append(CITATIONS["ark"])
    pooling_note = None
    if is_m3 and pooling != "cls":
        pooling_note = (
            f"This model pools the dense vector with `{pooling}`, not BGE-M3's CLS. FlagEmbedding must be told: "
            f'`BGEM3FlagModel(path, pooling_method="{pooling}")`; without it the dense vectors are wrong. '
            "sentence-transformers and ark_hf read the pooling from the folder."
        )

    base = model_display_name(
        base_model or getattr(args, "model_name_or_path", None) or getattr(model, "name_or_path", None)
    )
    base_text = f"[{base}](https://huggingface.co/{base})" if _is_hub_name(base) else f"`{base}`"
    model_id = model_id or getattr(args, "hub_model_id", None) or str(output_dir.absolute())
    rows = _merge_eval_rows(recorded.get("eval_rows", []), eval_table_rows(log_history))
    train_sources = train_sources or recorded.get("train_sources", [])
    plot_file = PLOT_FILE if plot and _plot(log_history, output_dir / PLOT_FILE) else None
    if plot_file is None and not log_history and (output_dir / PLOT_FILE).is_file():
        plot_file = PLOT_FILE  # drawn by an earlier write that had the log history
    objective_settings = [
        (key, model_display_name(value) if key == "teacher_model" else value)
        for key in _OBJECTIVE_KEYS
        if hasattr(args, key)
        for value in [getattr(args, key)]
    ]
    if is_m3:
        objective = (
            "BGE-M3's unified fine-tuning: InfoNCE per head (dense, sparse, ColBERT and their ensemble)"
            + (
                ", with self-knowledge distillation from the ensemble"
                if getattr(args, "use_self_distill", False)
                else ""
            )
            + (", with teacher-score distillation" if getattr(args, "knowledge_distillation", False) else "")
            + "."
            if getattr(args, "unified_finetuning", False)
            else "InfoNCE on the dense head over in-batch and hard negatives."
        )
    else:
        objective = "Qwen3-Embedding's InfoNCE over in-batch and hard negatives with false-negative masking."
    eval_sets = [
        {
            "name": getattr(e, "name", "") or "eval",
            "queries": len(getattr(e, "query_ids", [])),
            "corpus": len(getattr(e, "doc_ids", [])),
            "modes": ", ".join(getattr(e, "modes", ())),
        }
        for e in evaluators
        if hasattr(e, "query_ids")
    ] or recorded.get("eval_sets", [])
    datasets = list(datasets) if datasets else metadata.get("datasets")
    language = language or metadata.get("language")
    license = license or metadata.get("license")

    card_data = ModelCardData(
        library_name="sentence-transformers",
        base_model=base if _is_hub_name(base) else None,
        datasets=datasets or None,
        language=language,
        license=license,
        pipeline_tag="sentence-similarity",
        tags=list(
            dict.fromkeys(
                [
                    "ark_hf",
                    "sentence-transformers",
                    "feature-extraction",
                    "sentence-similarity",
                    "bge-m3" if is_m3 else "qwen3-embedding",
                    *(tags or []),
                    *metadata.get("tags", []),
                ]
            )
        ),  # fmt: skip
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name or output_dir.absolute().name,
        model_kind=kind,
        base_model_text=base_text,
        architecture=architecture,
        pooling=pooling,
        normalize=getattr(model, "normalize", True),
        heads=has_heads,
        heads_trained=heads_trained,
        pooling_note=pooling_note,
        train_sources=train_sources,
        eval_sets=eval_sets,
        objective=objective,
        objective_settings=objective_settings,
        hyperparameters=_non_default_hyperparameters(args),
        eval_table=_markdown_eval_table(rows) if rows else None,
        eval_name=None,
        plot_file=plot_file,
        model_id=model_id,
        ark_class=ark_class,
        ark_load_kwargs="" if not is_m3 or has_heads else ", unified_finetuning=False",
        ark_encode=ark_encode,
        versions=_versions(),
        citations=citations,
    )
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(path)
    card_data_record = {
        "base_model": base,
        "train_sources": train_sources,
        "eval_sets": eval_sets,
        "eval_rows": rows,
        "ark_alignment": bool(ark_alignment),
    }
    (output_dir / CARD_DATA_FILE).write_text(json.dumps(card_data_record, indent=2) + "\n", encoding="utf-8")
    if pooling_note and log_pooling_note:
        logger.warning("%s: %s", output_dir, pooling_note)
    return path
