"""The `ark-hf` command (also `python -m ark_hf`).

```bash
ark-hf train bge-m3 --config bge_m3_unified_self_distill --train_data data/train.jsonl --output_dir out/m3
ark-hf train qwen3 --config qwen3_full --train_data data/train.jsonl --output_dir out/qwen3
ark-hf eval out/m3 --data data/dev.jsonl --output out/m3/dev_metrics.json
ark-hf mine --data data/train.jsonl --model out/m3 --output data/train_mined.jsonl --relative_margin 0.05
ark-hf score --input_file data/train.jsonl --output_file data/train.align.jsonl --lm_name_or_path Qwen/Qwen2.5-7B-Instruct --rebuild_output data/train.ark.jsonl
ark-hf merge out/qwen3/checkpoint-1000 out/qwen3/checkpoint-2000 --output_dir out/qwen3/merged --method slerp
ark-hf card out/m3 --model_id user/my-m3
```

`train` runs the recipes (`ark_hf.recipes.bge_m3`, `ark_hf.recipes.qwen3_embedding`) with the same flags; `--config`
takes a shipped config's name (`ark_hf/recipes/configs/`) or a YAML path;
`score` is `recipes/compute_alignment.py` (ARK triple alignment, `ark_hf.alignment.pipeline.compute_alignment`).
Mistakes in the data, the config or the output folder print the message alone and exit with status 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

RECIPES = {"bge-m3": "ark_hf.recipes.bge_m3", "qwen3": "ark_hf.recipes.qwen3_embedding"}
CONFIGS = {"bge-m3": ("ark_hf.trainer.bge_config", "BGETrainerConfig"), "qwen3": ("ark_hf.trainer.qwen_config", "QwenTrainerConfig")}  # fmt: skip
EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a mistake of the user (bad data, config, paths), not a bug."""
    from ark_hf.models.bge_m3 import MissingHeadsError
    from ark_hf.trainer.base import OutputDirError

    return (ValueError, FileExistsError, OutputDirError, MissingHeadsError)


def _recipe(name: str) -> Any:
    """The recipe module of `ark-hf train NAME` (in the package: works from a wheel, from any folder)."""
    return importlib.import_module(RECIPES[name])


def _own_options_help(config_cls: type) -> str:
    """ark_hf's own fields of a config (those `TrainingArguments` lacks), grouped by the class declaring them."""
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    final = {f.name: f for f in dataclasses.fields(config_cls)}  # a subclass's default and help win
    lines = [f"{config_cls.__name__}: ark_hf's options (TrainingArguments' options follow)", ""]
    listed: set[str] = set()
    for cls in reversed([c for c in config_cls.__mro__ if dataclasses.is_dataclass(c) and c is not TrainingArguments]):
        own = [final[name] for name in vars(cls).get("__annotations__", {}) if name in final and name not in listed]
        own = [f for f in own if f.name not in inherited or f.name in ("learning_rate", "logging_steps")]
        listed.update(f.name for f in own)
        if not own:
            continue
        lines.append(f"{cls.__name__}:")
        for f in own:
            default = f.default if f.default is not dataclasses.MISSING else "(factory)"
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            lines.append(f"  --{f.name} (default: {default})")
            lines.append(f"      {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def _train_help() -> str:
    """`ark-hf train --help`: the recipes and the shipped configs."""
    configs = sorted(
        path.stem
        for path in (Path(__file__).parent / "recipes" / "configs").glob("*.yaml")
        if "\nstages:" not in "\n" + path.read_text(encoding="utf-8")  # a stage plan is passed as --curriculum
    )
    return "\n".join(
        [
            f"usage: ark-hf train {{{','.join(RECIPES)}}} [--config NAME_OR_YAML] [options]",
            "",
            "recipes:",
            "  bge-m3    BGETrainer: BGE-M3 (dense, sparse and ColBERT heads) on any encoder",
            "  qwen3     QwenTrainer: a decoder embedder with Qwen3-Embedding's InfoNCE",
            "",
            f"shipped configs (--config NAME): {', '.join(configs)}",
            "`ark-hf train RECIPE --help` lists the recipe's options.",
        ]
    )


def _training_arguments_help(config_cls: type) -> str:
    """The `TrainingArguments` flags a config also takes, by name only (their help: `--help-all`)."""
    import textwrap

    from transformers import TrainingArguments

    # those ark_hf declares again (learning_rate, logging_steps) are in the list above
    own = {name for cls in config_cls.__mro__[: config_cls.__mro__.index(TrainingArguments)]
           for name in vars(cls).get("__annotations__", {})}  # fmt: skip
    names = [f"--{f.name}" for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in own]
    return "\n".join(
        [
            "TrainingArguments' options, also taken (`--help-all` shows each one's help):",
            textwrap.fill(" ".join(names), width=118, initial_indent="  ", subsequent_indent="  "),
        ]
    )


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    asks_help = any(flag in rest for flag in ("-h", "--help"))
    if args.recipe is None:
        if asks_help:
            print(_train_help())
            return 0
        raise ValueError(f"name a recipe: ark-hf train {{{','.join(RECIPES)}}} ... (`ark-hf train --help`)")
    if "--help-all" in rest:  # the recipe parser's own help: every option with its help text
        _recipe(args.recipe).main(["--help"])
        return 0
    if asks_help:
        module_name, class_name = CONFIGS[args.recipe]
        config_cls = getattr(importlib.import_module(module_name), class_name)
        print(f"usage: ark-hf train {args.recipe} [--config NAME_OR_YAML] [options]\n")
        print(_own_options_help(config_cls))
        print(_training_arguments_help(config_cls))
        return 0
    _recipe(args.recipe).main(rest)  # prints the metrics table itself (and writes retrieval_metrics.json)
    return 0


def _eval(args: argparse.Namespace, rest: list[str]) -> int:
    from ark_hf.evaluation.data import load_eval_set
    from ark_hf.evaluation.ir import METRICS, MODES, IREvaluator
    from ark_hf.models.checks import ModelNotFoundError, check_model_exists
    from ark_hf.models.loading import load_embedder
    from ark_hf.utils.cli import did_you_mean

    if rest:
        raise ValueError(f"unknown arguments: {' '.join(rest)}")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"output {args.output} exists; pass --overwrite to replace it")
    for mode in args.modes or []:
        if mode not in MODES:
            raise ValueError(
                f"--modes: unknown evaluation mode '{mode}'{did_you_mean(mode, MODES)}; the modes are {', '.join(MODES)}"
            )
    queries, corpus, qrels = load_eval_set(args.data, split=args.split)  # checked before the model loads
    check_model_exists(args.model, "model")
    try:
        model = load_embedder(args.model, args.model_type, args.device)
    except OSError as error:  # the Hub has no such repository, or cannot be reached
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"model '{args.model}': cannot be loaded ({reason})") from error
    modes = args.modes or (list(MODES) if getattr(model, "has_heads", False) else ["dense"])
    evaluator = IREvaluator(
        queries, corpus, qrels, modes=modes, query_instruction=args.query_instruction,
        query_instruction_format=args.query_instruction_format, query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len, batch_size=args.batch_size, rerank_top_k=args.rerank_top_k,
    )  # fmt: skip
    metrics = evaluator(model)
    print(f"{args.model} on {args.data}: {len(evaluator.query_ids)} queries, {len(evaluator.doc_ids)} documents")
    print(f"{'mode':<14}" + "".join(f"{m:>12}" for m in METRICS))
    for mode in modes:
        print(f"{mode:<14}" + "".join(f"{metrics[f'{mode}_{m}']:>12.4f}" for m in METRICS))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {args.output}")
    return 0


def _mine(args: argparse.Namespace, rest: list[str]) -> int:
    from transformers import HfArgumentParser

    from ark_hf.mining import MiningArguments, mine_hard_negatives

    parser = HfArgumentParser(MiningArguments, prog="ark-hf mine")
    (options,) = parser.parse_args_into_dataclasses(args=rest)
    values = dataclasses.asdict(options)
    data, model = values.pop("data"), values.pop("model")
    values["output_path"] = values.pop("output")
    values["corpus_files"] = values.pop("corpus")
    result = mine_hard_negatives(data, model, **values)
    print(json.dumps(result.stats, indent=2))
    print(f"mined records written to {result.output_path}")
    return 0


def _score(args: argparse.Namespace, rest: list[str]) -> int:
    from ark_hf.alignment.pipeline import main as compute_alignment_main

    written = compute_alignment_main(rest, prog="ark-hf score")
    print(f"written: {written}")
    return 0


def _merge(args: argparse.Namespace, rest: list[str]) -> int:
    from ark_hf.merging import merge_checkpoints

    if rest:
        raise ValueError(f"unknown arguments: {' '.join(rest)}")
    output = merge_checkpoints(
        args.checkpoints, args.output_dir, method=args.method, weights=args.weights, t=args.t, overwrite=args.overwrite
    )
    print(f"merged {len(args.checkpoints)} checkpoints ({args.method}) into {output}")
    return 0


def _card(args: argparse.Namespace, rest: list[str]) -> int:
    import torch
    from transformers import TrainerState

    from ark_hf.hub import CARD_DATA_FILE, write_model_card

    if rest:
        raise ValueError(f"unknown arguments: {' '.join(rest)}")
    folder = Path(args.model_dir)
    args_file = folder / "training_args.bin"
    if not args_file.is_file():
        raise ValueError(f"{folder}: no training_args.bin; `ark-hf card` needs a folder saved by an ark_hf trainer")
    # the file is the trainer's own pickle of its config (not a download), so a full load is what it takes
    training_args = torch.load(args_file, weights_only=False)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        checkpoints = sorted(
            folder.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
        )
        state_file = checkpoints[-1] if checkpoints else None
    log_history = TrainerState.load_from_json(str(state_file)).log_history if state_file else []
    path = write_model_card(
        log_history, folder, args=training_args, model_id=args.model_id, model_name=args.model_name
    )
    recorded = json.loads((folder / CARD_DATA_FILE).read_text(encoding="utf-8")).get("eval_rows")  # as merged
    source = f"evaluation rows from {CARD_DATA_FILE}" if recorded else "no evaluation table"
    print(f"model card written to {path}" + ("" if state_file else f" (no trainer_state.json: {source})"))
    return 0


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="Show the full traceback of errors.")
    parser = argparse.ArgumentParser(
        prog="ark-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,mine,score,merge,card}")

    train = commands.add_parser(
        "train", parents=[debug], add_help=False, help="Fine-tune with a recipe (same flags as the recipe)."
    )
    train.add_argument("recipe", nargs="?", choices=list(RECIPES), help="bge-m3 (BGETrainer) or qwen3 (QwenTrainer).")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", parents=[debug], help="Evaluate a saved model on an evaluation set.")
    evaluate.add_argument("model", help="A saved ark_hf folder or a Hub name.")
    evaluate.add_argument(
        "--data", required=True,
        help="Evaluation set: JSON {queries, corpus, qrels}, a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), "
        "or training records (.jsonl, a .json array, or a folder).",
    )  # fmt: skip
    evaluate.add_argument("--split", default="test", help="qrels split of a BEIR folder (qrels/<split>.tsv).")
    evaluate.add_argument("--modes", nargs="+", help="Scoring modes (default: all five with M3 heads, else dense).")
    evaluate.add_argument("--output", help="Write the metrics as JSON here.")
    evaluate.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    evaluate.add_argument("--model_type", default="auto", choices=["auto", "bge-m3", "qwen3"])
    evaluate.add_argument("--query_instruction", default=None, help="Instruction for queries.")
    evaluate.add_argument("--query_instruction_format", default="{}{}", help="How instruction and query are joined.")
    evaluate.add_argument("--query_max_len", type=int, default=64)
    evaluate.add_argument("--passage_max_len", type=int, default=512)
    evaluate.add_argument("--batch_size", type=int, default=64)
    evaluate.add_argument("--rerank_top_k", type=int, default=None, help="ColBERT re-ranks the top-k (default: all).")
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(handler=_eval)

    mine = commands.add_parser(
        "mine", parents=[debug], add_help=False, help="Mine hard negatives with a model (ark_hf.mining)."
    )
    mine.set_defaults(handler=_mine)

    score = commands.add_parser(
        "score", parents=[debug], add_help=False,
        help="ARK triple alignment: score candidate chunks with a causal LM, rebuild training records.",
    )  # fmt: skip
    score.set_defaults(handler=_score)

    merge = commands.add_parser("merge", parents=[debug], help="Merge checkpoints (slerp or linear).")
    merge.add_argument("checkpoints", nargs="+", help="Checkpoint folders (full models or LoRA adapters).")
    merge.add_argument("--output_dir", required=True)
    merge.add_argument("--method", default="slerp", choices=["slerp", "linear"])
    merge.add_argument("--weights", type=float, nargs="+", default=None, help="One weight per checkpoint.")
    merge.add_argument("--t", type=float, default=None, help="slerp position between two checkpoints.")
    merge.add_argument("--overwrite", action="store_true")
    merge.set_defaults(handler=_merge)

    card = commands.add_parser("card", parents=[debug], help="(Re)write the model card of a saved folder.")
    card.add_argument("model_dir")
    card.add_argument("--model_id", default=None, help="Name the usage snippets load (e.g. user/model).")
    card.add_argument("--model_name", default=None, help="Title of the card.")
    card.set_defaults(handler=_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `ark-hf`; returns the exit status (0, or 2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if "--debug" in rest:  # flags after the recipe's own ones still count
        rest.remove("--debug")
        args.debug = True
    try:
        return args.handler(args, rest)
    except _user_errors() as error:
        if args.debug:
            raise
        print(f"ark-hf {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # a recipe's own usage error (`raise SystemExit("...")`)
            if args.debug:
                raise
            print(f"ark-hf {args.command}: error: {exit_.code}", file=sys.stderr)
            return EXIT_USER_ERROR
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())
