"""Checks of settings against the data they name, run before any model weights load and before anything is written.

Two classes of mistake that would otherwise surface late or never:

- **Name-keyed settings** (`NAME_KEYED_SETTINGS`: today `dataset_instructions`, keyed by training file) whose
  keys match no file: the setting silently never applies. `check_name_keyed_settings` matches every key of every
  such setting against the files a run reads (`train_data`, or every stage's `datasets` under a curriculum) in
  one place, and refuses unknown names with a "did you mean". A new per-file setting is one more entry in
  `NAME_KEYED_SETTINGS`.
- **Groups that cannot be filled**: a record without negatives has its group of `train_group_size` passages
  filled with other records' positives (`TrainGroupDataset`); when no other record offers a different passage
  (identical records, a single record), or teacher scores are required, the first batch would fail.
  `check_group_feasibility` counts such records and refuses them, naming the first ones by file and line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ark_hf.data.dataset import instruction_keys
from ark_hf.utils.cli import ConfigError, did_you_mean

__all__ = [
    "NAME_KEYED_SETTINGS",
    "check_group_feasibility",
    "check_name_keyed_settings",
    "data_file_names",
]

# settings whose keys name training files (a path as given, a file name, or a file name without extension)
NAME_KEYED_SETTINGS = ("dataset_instructions",)


def data_file_names(sources: Iterable[str | os.PathLike]) -> list[str]:
    """The data files a list of paths stands for, folders expanded as `load_training_records` expands them
    (named as records' `source` is); paths that do not exist are left out (the loader reports them)."""
    from ark_hf.data.loading import _resolve_sources

    resolved, _ = _resolve_sources([os.fspath(source) for source in sources], None)
    return [source.location for source in resolved]


def check_name_keyed_settings(settings: Mapping[str, Any], files: Sequence[str], *, where: str = "") -> None:
    """Refuse keys of name-keyed settings (`NAME_KEYED_SETTINGS`) that match none of `files`.

    Args:
        settings: the config (any object with the settings as attributes) or a mapping `{setting: value}`.
        files: the data files of the run (`data_file_names`), or the records' sources.
        where: where the files come from, for the message (e.g. `"the curriculum's stages"`).

    Raises:
        ConfigError: `key 'dataset_instructions': 'ms_marco' matches no training file (did you mean 'msmarco'?);
            the files are ...`.
    """
    if not files:
        return
    known: dict[str, None] = {}
    for file in files:
        known.update(dict.fromkeys(instruction_keys(file)))
    problems = []
    for setting in NAME_KEYED_SETTINGS:
        value = settings.get(setting) if isinstance(settings, Mapping) else getattr(settings, setting, None)
        if not isinstance(value, Mapping):
            continue
        for key in value:
            if key not in known:
                problems.append(f"'{key}'{did_you_mean(str(key), known)}")
        if problems:
            shown = ", ".join(files[:10]) + (f", ... ({len(files)} in all)" if len(files) > 10 else "")
            source = f" of {where}" if where else ""
            raise ConfigError(
                f"key '{setting}': {', '.join(problems)} match(es) no training file{source}; the files are {shown} "
                "(a key is a path as given, a file name, or a file name without its extension)"
            )


def check_group_feasibility(
    records: Sequence[Mapping[str, Any]],
    train_group_size: int,
    *,
    use_teacher_scores: bool = False,
    where: str = "",
) -> None:
    """Refuse records whose group of `train_group_size` passages cannot be filled under `TrainGroupDataset`'s rules.

    A record with negatives fills its group from them (repeating when it has fewer). A record without negatives
    takes other records' positives, never its own; that needs a positive, somewhere in the data, that is not one
    of its own, and it cannot carry teacher scores.

    Raises:
        ConfigError: naming `train_group_size`, the counts, and the first records by file and line.
    """
    if train_group_size <= 1 or not records:
        return
    lacking = [record for record in records if not record.get("neg")]
    if not lacking:
        return
    stage = f" ({where})" if where else ""
    if use_teacher_scores:
        raise ConfigError(
            f"key 'train_group_size'{stage}: {len(lacking)} of {len(records)} records have no negatives "
            f"({_name_records(lacking)}), so their groups of {train_group_size} passages cannot carry teacher scores "
            "(the filling passages have none); give them 'neg' and 'neg_scores', or set train_group_size: 1"
        )
    positives = {text for record in records for text in record["pos"]}
    stuck = [record for record in lacking if len(positives) <= len(set(record["pos"]))]
    if stuck:
        raise ConfigError(
            f"key 'train_group_size'{stage}: {len(stuck)} of {len(records)} records have no negatives and no other "
            f"record offers a different passage to fill their group of {train_group_size} ({_name_records(stuck)}; "
            f"the {len(records)} records hold {len(positives)} distinct positive(s)); add negatives ('neg'), add "
            "records with other passages, or set train_group_size: 1"
        )


def _name_records(records: Sequence[Mapping[str, Any]], limit: int = 3) -> str:
    names = [str(record.get("id") or f"{record.get('source', '?')}:{record.get('line', '?')}") for record in records]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
