"""Trainer-level throughput, side by side: FlagEmbedding's M3 runner, sentence-transformers' trainer and
ark_hf's `BGETrainer` / `QwenTrainer`, each launched the way its users launch it, on the same data, the same
hyperparameters and the same number of steps, in one run on one GPU.

Data: real text from the Zaragoza construction FAQ (`zaragoza-construction-faq`), cut to the variable-length
mix: queries of 4-40 words, passages of log-normal length (median 60 words), truncated at 512 tokens; 8
queries x (1 positive + 7 hard negatives) per step (recipe-shape rows: 32 queries, BGE-M3's per-device recipe
shape, with gradient checkpointing as its example script runs it); bf16 autocast over fp32 weights, fused AdamW,
lr 1e-5, SDPA, no checkpointing unless a row says so. Rows name `padding_free` explicitly, except the
"default config" rows, which leave every speed switch (padding_free, checkpointing, kernels) at the trainer config's
default and so measure what a user gets; the Qwen3 rows all use the objective MNRL computes. Models: random-init replicas of BGE-M3 (XLM-R large) and Qwen3-0.6B with the real
tokenizers (`ark_hf.assets`); the M3 sparse and ColBERT heads are saved with the replica, so both M3 tools
start from the same weights.

Every row runs in its own subprocess under a time cap; a failure is recorded and the next row runs. A
forward pre-hook on the backbone counts the tokens each tool computes (padded) and the real ones
(attention mask, or the packed `cu_seqlens`), in gradient-enabled passes only. Reported per row: real
tokens/s, padding share, samples/s, step time, peak memory, the loss of step 1 and the mean loss, model
FLOPs utilisation (6 N_nonemb per real token + 12 L H per pair of attended tokens, against the matmul peak
measured in the same run) and the ratio to the raw limit of the architecture at the same real tokens per step
(measured in the same run). Each row runs `--repeats` times (default 3, fresh processes, every row once before
any repeat) and reports its median run with the spread (min / median / max tokens/s).

    python bench/throughput.py --out bench/results/throughput_h200            # GPU: json + md
    python bench/throughput.py --core --repeats 1 --out /tmp/tp               # the core rows (gpu_check.py)
    python bench/throughput.py --device cpu --tiny --out bench/results/throughput_cpu_tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B, G, QLEN, PLEN, LR = 8, 8, 64, 512, 1e-5

# name -> (architecture, tool, options). Options: `queries` per step (default B; recipe-shape rows 32), `checkpointing`
# (gradient checkpointing; default off), `default` (every speed switch at the trainer config's default: padding_free,
# checkpointing, kernels), the speed switches themselves, and for raw rows `tokens_of`: the shape of the rows whose
# real tokens per step the raw row matches ("8x8", "32x8", or "budget" for the token-budget row).
RECIPE_QUERIES = 32  # BGE-M3's per-device recipe shape: 32 queries x 8 passages, up to 512 tokens
BUDGET = 24576
ROWS: dict[str, tuple[str, str, dict]] = {
    "raw limit bge-m3 at 8x8 tokens/step": ("bge", "raw", {"seqlen": 256, "tokens_of": "8x8"}),
    "flagembedding m3 runner unified+self-distill": ("bge", "fe", {"unified": True}),
    "ark_hf BGETrainer unified+self-distill default config": ("bge", "ark", {"unified": True, "default": True}),
    "ark_hf BGETrainer unified+self-distill padded": ("bge", "ark", {"unified": True, "padding_free": False}),
    "ark_hf BGETrainer unified+self-distill padding-free": ("bge", "ark", {"unified": True, "padding_free": True}),
    "flagembedding m3 runner dense": ("bge", "fe", {"unified": False}),
    "ark_hf BGETrainer dense padding-free": ("bge", "ark", {"unified": False, "padding_free": True}),
    "sentence-transformers MNRL cls": ("bge", "st", {"cached": False}),
    "sentence-transformers CachedMNRL(mini=32) cls": ("bge", "st", {"cached": True}),
    "raw limit bge-m3 at 32x8 tokens/step": ("bge", "raw", {"seqlen": 256, "tokens_of": "32x8"}),
    "flagembedding m3 runner unified+self-distill 32x8 + checkpointing": (
        "bge",
        "fe",
        {"unified": True, "queries": RECIPE_QUERIES, "checkpointing": True},
    ),
    "ark_hf BGETrainer unified+self-distill default config 32x8 + checkpointing": (
        "bge",
        "ark",
        {"unified": True, "default": True, "queries": RECIPE_QUERIES, "checkpointing": True},
    ),
    "raw limit bge-m3 at token-budget tokens/step": ("bge", "raw", {"seqlen": 256, "tokens_of": "budget"}),
    "ark_hf BGETrainer unified+self-distill padding-free + token budget": (
        "bge",
        "ark",
        {"unified": True, "padding_free": True, "max_tokens_per_batch": BUDGET, "group_by_length": True},
    ),
    "ark_hf BGETrainer unified+self-distill padded + group_by_length": (
        "bge",
        "ark",
        {"unified": True, "padding_free": False, "group_by_length": True},
    ),
    "raw limit qwen3-0.6b at 8x8 tokens/step": ("qwen", "raw", {"seqlen": 256, "tokens_of": "8x8"}),
    "sentence-transformers MNRL lasttoken (Qwen3)": ("qwen", "st", {"cached": False}),
    "ark_hf QwenTrainer default config": ("qwen", "ark", {"default": True}),
    "ark_hf QwenTrainer padded": ("qwen", "ark", {"padding_free": False}),
    "ark_hf QwenTrainer padding-free": ("qwen", "ark", {"padding_free": True}),
    "ark_hf QwenTrainer padding-free + liger": ("qwen", "ark", {"padding_free": True, "liger_kernel": True}),
    "ark_hf QwenTrainer padding-free + liger + compile": (
        "qwen",
        "ark",
        {"padding_free": True, "liger_kernel": True, "compile_backbone": True},
    ),
    "sentence-transformers CachedMNRL(mini=32) lasttoken (Qwen3)": ("qwen", "st", {"cached": True}),
}
# the rows `--core` runs (bench/gpu_check.py): each architecture's raw limit, FlagEmbedding's unified runner and the
# trainers' default configs, at 8 queries x 8 passages
CORE_ROWS = [
    "raw limit bge-m3 at 8x8 tokens/step",
    "flagembedding m3 runner unified+self-distill",
    "ark_hf BGETrainer unified+self-distill default config",
    "raw limit qwen3-0.6b at 8x8 tokens/step",
    "ark_hf QwenTrainer default config",
]


def shape_of(options: dict) -> str:
    """The key of the raw row a row is compared with: its queries x passages, or the token budget."""
    if options.get("max_tokens_per_batch"):
        return "budget"
    return options.get("tokens_of") or f"{options.get('queries', B)}x{G}"


# ----------------------------------------------------------------------------------------------- preparation
def make_data(path: Path, n: int, seed: int = 0) -> dict:
    """Records of real FAQ text at the mix's lengths; ark_hf/FlagEmbedding jsonl (query, pos, neg)."""
    from ark_hf import assets

    faq = assets.load_faq("en")
    stream = " ".join(f"{row['q']} {row['a']}" for row in faq).split()
    rng = random.Random(seed)

    def cut(k: int) -> str:
        start = rng.randrange(0, len(stream) - k)
        return " ".join(stream[start : start + k])

    def passage() -> str:
        return cut(max(3, min(600, int(rng.lognormvariate(math.log(60), 0.8)))))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            record = {"query": cut(rng.randint(4, 40)), "pos": [passage()], "neg": [passage() for _ in range(G - 1)]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"records": n, "faq_rows": len(faq), "words_in_stream": len(stream)}


def make_replicas(folder: Path, tiny: bool, archs: tuple[str, ...] = ("bge", "qwen")) -> dict[str, str]:
    import torch
    from transformers import Qwen3Config, Qwen3Model, XLMRobertaConfig, XLMRobertaModel

    from ark_hf import assets

    paths = {"bge": folder / "bge_m3_replica", "qwen": folder / "qwen3_replica"}
    paths = {arch: path for arch, path in paths.items() if arch in archs}
    if tiny:
        if "bge" in paths:
            assets.build_tiny_xlmr(paths["bge"])
        if "qwen" in paths:
            assets.build_tiny_qwen3(paths["qwen"])
    elif "bge" in paths:
        torch.manual_seed(0)
        tok = assets.build_xlmr_tokenizer()
        cfg = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
                               layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip
        XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(paths["bge"])
        tok.save_pretrained(paths["bge"])
    if "qwen" in paths and not tiny:
        qtok = assets.build_qwen3_tokenizer()
        qcfg = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                           rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                           eos_token_id=qtok.eos_token_id, pad_token_id=qtok.pad_token_id)  # fmt: skip
        Qwen3Model(qcfg).save_pretrained(paths["qwen"])
        qtok.save_pretrained(paths["qwen"])
    if "bge" not in paths:
        return {k: str(v) for k, v in paths.items()}
    # M3 heads saved with the replica: FlagEmbedding and ark_hf load the same ones
    hidden = XLMRobertaConfig.from_pretrained(paths["bge"]).hidden_size
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), paths["bge"] / "colbert_linear.pt")
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), paths["bge"] / "sparse_linear.pt")
    return {k: str(v) for k, v in paths.items()}


def matmul_peak() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 / ((time.perf_counter() - t) / 10) / 1e12


# ----------------------------------------------------------------------------------------------- measurement
class Meter:
    """Counts real and computed tokens of gradient-enabled backbone calls and times optimizer steps."""

    def __init__(self, device: str, warmup: int):
        import torch

        self.torch, self.device, self.warmup = torch, device, warmup
        self.reset_step()
        self.steps: list[dict] = []
        self.t0 = None

    def reset_step(self):
        self.real = self.computed = self.texts = 0
        self.pairs = 0  # sum over texts of length^2 (attention FLOPs)
        self._pending = []

    def hook(self, module, args, kwargs):
        torch = self.torch
        if not torch.is_grad_enabled():
            return
        if kwargs.get("cu_seq_lens_q") is not None:
            lengths = kwargs["cu_seq_lens_q"].diff()
            computed = None
        elif kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:
            mask = kwargs["attention_mask"]
            lengths, computed = mask.sum(-1), mask.numel()
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            lengths, computed = torch.full((ids.shape[0],), ids.shape[1], device=ids.device), ids.numel()
        self._pending.append((lengths, computed))

    def attach(self, backbone):
        """Wrap the backbone's `forward` (sentence-transformers calls `model.forward` directly, past hooks)."""
        original = backbone.forward

        def forward(*args, **kwargs):
            self.hook(backbone, args, kwargs)
            return original(*args, **kwargs)

        backbone.forward = forward

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step_begin(self):
        self.sync()
        self.t0 = time.perf_counter()
        if len(self.steps) == self.warmup and self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def step_end(self):
        self.sync()
        dt = time.perf_counter() - self.t0
        real = computed = texts = pairs = 0
        for lengths, comp in self._pending:
            lengths = lengths.long()
            n = int(lengths.sum())
            real += n
            computed += n if comp is None else int(comp)
            texts += int(lengths.numel())
            pairs += int((lengths * lengths).sum())
        self.steps.append({"s": dt, "real": real, "computed": computed, "texts": texts, "pairs": pairs})
        self._pending = []


def callback(meter: Meter):
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.step_begin()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    return _Timer()


def common_args(spec: dict, output_dir: str, options: dict) -> dict:
    """The hyperparameters every tool gets; gradient checkpointing as the row says (default-config rows: unset)."""
    cuda = spec["device"] == "cuda"
    fields = dict(
        output_dir=output_dir, max_steps=spec["steps"], per_device_train_batch_size=options.get("queries", B),
        learning_rate=LR, warmup_steps=0, bf16=cuda, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=42, dataloader_num_workers=0,
    )  # fmt: skip
    if "checkpointing" in options or not options.get("default"):
        fields["gradient_checkpointing"] = options.get("checkpointing", False)
    return fields


def tokens_per_step(data: Path, models: dict[str, str]) -> dict[str, dict[str, int]]:
    """Mean real tokens one step computes at each shape (queries truncated at QLEN, passages at PLEN), per
    architecture: the raw-limit rows run dense batches of this many tokens. The token-budget shape is the budget,
    the upper bound of what a budget step holds."""
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    out = {}
    for arch, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        query = [len(ids) for ids in tok([r["query"] for r in rows], truncation=True, max_length=QLEN)["input_ids"]]
        texts = [p for r in rows for p in r["pos"] + r["neg"]]
        passage = [len(ids) for ids in tok(texts, truncation=True, max_length=PLEN)["input_ids"]]
        group = sum(query) / len(query) + G * sum(passage) / len(passage)
        out[arch] = {f"{q}x{G}": round(q * group) for q in (B, RECIPE_QUERIES)}
        out[arch]["budget"] = BUDGET
    return out


def run_ark(spec, arch, options, output_dir, meter):
    from ark_hf.trainer.bge_config import BGETrainerConfig
    from ark_hf.trainer.bge_trainer import BGETrainer
    from ark_hf.trainer.qwen_config import QwenTrainerConfig
    from ark_hf.trainer.qwen_trainer import QwenTrainer

    fields = common_args(spec, output_dir, options)
    fields.update(model_name_or_path=spec["models"][arch], train_data=[spec["data"]], train_group_size=G,
                  query_max_len=QLEN, passage_max_len=PLEN)  # fmt: skip
    # a speed switch a row does not name keeps the config's default (the default-config rows name none)
    fields.update({k: options[k] for k in ("padding_free", "liger_kernel", "compile_backbone") if k in options})
    if options.get("max_tokens_per_batch"):
        fields["max_tokens_per_batch"] = 4096 if spec["tiny"] else options["max_tokens_per_batch"]
    if options.get("group_by_length"):
        fields["train_sampling_strategy"] = "group_by_length"
    if arch == "bge":
        config = BGETrainerConfig(**fields, unified_finetuning=options["unified"],
                                  use_self_distill=options["unified"], self_distill_start_step=-1, temperature=0.02)  # fmt: skip
        trainer = BGETrainer(config=config)
    else:
        # the objective sentence-transformers' MNRL computes: in-batch + hard negatives, no q-q / d-d, no mask
        config = QwenTrainerConfig(**fields, torch_dtype="float32", attn_implementation="sdpa", temperature=0.02,
                                   use_qq=False, use_dd=False, mask_false_negatives=False, query_instruction=None)  # fmt: skip
        trainer = QwenTrainer(config=config)
    model = trainer.model
    backbone = model.backbone if hasattr(model, "backbone") else model.model
    meter.attach(backbone)
    trainer.add_callback(callback(meter))
    trainer.train()
    return trainer


def run_fe(spec, arch, options, output_dir, meter):
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3Runner,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    fields = common_args(spec, output_dir, options)
    argv = [f"--model_name_or_path={spec['models'][arch]}", f"--train_data={spec['data']}",
            f"--train_group_size={G}", f"--query_max_len={QLEN}", f"--passage_max_len={PLEN}",
            "--temperature=0.02", "--sentence_pooling_method=cls", "--normalize_embeddings=True",
            f"--unified_finetuning={options['unified']}", f"--use_self_distill={options['unified']}",
            "--self_distill_start_step=-1", "--pad_to_multiple_of=8"]  # fmt: skip
    for key, value in fields.items():
        argv.append(f"--{key}={value}")
    parser = HfArgumentParser(
        (
            EncoderOnlyEmbedderM3ModelArguments,
            EncoderOnlyEmbedderM3DataArguments,
            EncoderOnlyEmbedderM3TrainingArguments,
        )
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    runner = EncoderOnlyEmbedderM3Runner(model_args=model_args, data_args=data_args, training_args=training_args)
    meter.attach(runner.model.model)
    runner.trainer.add_callback(callback(meter))
    runner.trainer.train()  # runner.run() minus its final save
    return runner.trainer


def run_st(spec, arch, options, output_dir, meter):
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.models import Normalize, Pooling, Transformer

    rows = [json.loads(line) for line in open(spec["data"], encoding="utf-8")]
    columns = {"anchor": [r["query"] for r in rows], "positive": [r["pos"][0] for r in rows]}
    for j in range(G - 1):
        columns[f"negative_{j + 1}"] = [r["neg"][j] for r in rows]
    dataset = datasets.Dataset.from_dict(columns)
    transformer = Transformer(spec["models"][arch], max_seq_length=PLEN, model_args={"attn_implementation": "sdpa"})
    dim = transformer.get_word_embedding_dimension()
    pooling = Pooling(dim, pooling_mode="cls" if arch == "bge" else "lasttoken")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=spec["device"])
    scale = 1 / 0.02
    loss = (
        losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=32)
        if options["cached"]
        else losses.MultipleNegativesRankingLoss(model, scale=scale)
    )
    args = SentenceTransformerTrainingArguments(**common_args(spec, output_dir, options))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    meter.attach(model[0].auto_model)
    trainer.add_callback(callback(meter))
    trainer.train()
    return trainer


def run_raw(spec, arch, options, output_dir, meter):
    """The anchor's raw limit: backbone fwd+bwd+fused AdamW on dense random ids (no data, no loss), as many
    tokens per step as the rows it is compared with compute (`tokens_of`)."""
    import torch
    from transformers import AutoModel

    device, cuda = spec["device"], spec["device"] == "cuda"
    model = AutoModel.from_pretrained(spec["models"][arch], attn_implementation="sdpa").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=cuda)
    batch = max(1, round(spec["tokens_per_step"][arch][options["tokens_of"]] / options["seqlen"]))
    ids = torch.randint(5, 1000, (batch, options["seqlen"]), device=device)
    mask = torch.ones_like(ids)
    meter.attach(model)
    for _ in range(spec["steps"]):
        meter.step_begin()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0].float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.step_end()
    return None


def child(row: str, spec_path: str, result_path: str) -> None:
    import torch
    from transformers import AutoConfig

    spec = json.loads(Path(spec_path).read_text())
    arch, tool, options = ROWS[row]
    meter = Meter(spec["device"], spec["warmup"])
    output_dir = tempfile.mkdtemp(prefix="tp_", dir=spec["workdir"])
    os.rmdir(output_dir)
    runner = {"ark": run_ark, "fe": run_fe, "st": run_st, "raw": run_raw}[tool]
    trainer = runner(spec, arch, options, output_dir, meter)
    timed = meter.steps[spec["warmup"] :]
    seconds = sum(s["s"] for s in timed)
    real = sum(s["real"] for s in timed)
    computed = sum(s["computed"] for s in timed)
    texts = sum(s["texts"] for s in timed)
    pairs = sum(s["pairs"] for s in timed)
    cfg = AutoConfig.from_pretrained(spec["models"][arch])
    from transformers import AutoModel

    with torch.device("meta"):
        shell = AutoModel.from_config(cfg)
    n_params = sum(p.numel() for p in shell.parameters())
    n_emb = shell.get_input_embeddings().weight.numel()
    flops = 6 * (n_params - n_emb) * real + 12 * cfg.num_hidden_layers * cfg.hidden_size * pairs
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] if trainer is not None else []
    result = {
        "row": row, "arch": arch, "tool": tool, "options": options, "timed_steps": len(timed),
        "step_s": round(seconds / max(1, len(timed)), 4), "real_tokens_per_s": round(real / seconds),
        "computed_tokens_per_s": round(computed / seconds), "padding_share": round(1 - real / max(1, computed), 3),
        "samples_per_s": round(texts / (1 + G) / seconds, 2) if tool != "raw" else None,
        "tflops": round(flops / seconds / 1e12, 1),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if spec["device"] == "cuda" else None,
        "step1_loss": round(losses[0], 4) if losses else None,
        "mean_loss": round(sum(losses) / len(losses), 4) if losses else None,
        "steps_run": len(meter.steps), "shape": shape_of(options),
        "real_tokens_per_step": round(real / max(1, len(timed))),
    }  # fmt: skip
    Path(result_path).write_text(json.dumps(result))
    del trainer
    gc.collect()


# ---------------------------------------------------------------------------------------------------- parent
def versions() -> dict:
    import importlib

    out = {}
    for name in ["torch", "transformers", "accelerate", "datasets", "sentence_transformers", "FlagEmbedding",
                 "liger_kernel", "triton", "peft"]:  # fmt: skip
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:
            out[name] = f"missing ({type(error).__name__})"
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Trainer-level throughput, side by side",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Device: {report['device_name']}; matmul bf16 peak measured {report.get('matmul_peak_tflops')} TFLOP/s. "
        f"Versions: {json.dumps(report['versions'])}.",
        "",
        f"Data: {report['data']} FAQ-text records at the variable-length mix (queries 4-40 words, passages "
        f"log-normal median 60 words, max {PLEN} tokens); {B} queries x {G} passages per step "
        f"(rows marked 32x8: {RECIPE_QUERIES} queries, BGE-M3's recipe shape; token-budget rows: as many as fit in "
        f"{BUDGET} tokens), {report['steps']} steps, the first {report['warmup']} untimed; up to {report['repeats']} "
        "runs of each row, each in a fresh process (figures: the median run; spread: min / median / max real "
        "tokens/s). Raw-limit rows run dense 256-token sequences, as many real tokens per step as the rows of their "
        f"shape ({json.dumps(report.get('tokens_per_step'))}).",
        "",
        "| row | real tok/s | spread (runs) | padding | samples/s | step s | peak GiB | step-1 loss | mean loss | "
        "TFLOP/s | MFU | x raw limit | x peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:160]} |" + " |" * 12)
            continue
        spread = r.get("spread", {})
        spread_text = (
            f"{spread['min']:,} / {spread['median']:,} / {spread['max']:,} ({spread['runs']})" if spread else ""
        )
        lines.append(
            f"| {r['row']} | {r['real_tokens_per_s']:,} | {spread_text} | {r['padding_share']:.0%} | "
            f"{r['samples_per_s']} | {r['step_s']} | {r['peak_mem_GiB']} | {r['step1_loss']} | {r['mean_loss']} | "
            f"{r['tflops']} | {r.get('mfu', '')} | {r.get('x_raw_limit', '')} | {r.get('x_peer', '')} |"
        )
    lines += ["", "`x raw limit`: over the raw-limit row of the same shape; `x peer`: real tokens/s over FlagEmbedding's "
              "unified runner at the same shape (BGE rows) or sentence-transformers MNRL (Qwen3 rows), same run. "
              "Memory ratio in `mem_vs_peer` of the json. Failed runs of a row that also ran: `failed_runs`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def parent(ns) -> None:
    import torch

    device = ns.device
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="throughput_"))
    spec = {"device": device, "tiny": ns.tiny, "steps": ns.steps, "warmup": ns.warmup, "workdir": str(workdir)}
    rows = CORE_ROWS if ns.core else list(ROWS)
    rows = [r for r in rows if not ns.only or any(o in r for o in ns.only)]
    if ns.tiny:
        rows = [r for r in rows if ROWS[r][1] != "fe" or device == "cuda"]
        rows = [r for r in rows if not (device == "cpu" and ROWS[r][2].get("compile_backbone"))]  # minutes on CPU
    # only the architectures the rows train (a full-size replica takes a while to build and save)
    spec["models"] = make_replicas(workdir, ns.tiny, archs=tuple(sorted({ROWS[r][0] for r in rows})))
    data = workdir / "train.jsonl"
    info = make_data(data, n=max(64, (ns.steps + 2) * RECIPE_QUERIES))
    spec["data"] = str(data)
    spec_path = workdir / "spec.json"
    report = {
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]), "versions": versions(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "data": info["records"],
        "steps": ns.steps, "warmup": ns.warmup, "repeats": ns.repeats, "rows": [],
        "prep_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    if device == "cuda":
        report["matmul_peak_tflops"] = round(matmul_peak())
        torch.cuda.empty_cache()
    spec["tokens_per_step"] = report["tokens_per_step"] = tokens_per_step(data, spec["models"])
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(workdir / "hf_datasets"))  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    # every row once, then the repeats: a run cut by the budget still has each row at least once
    for repeat in range(ns.repeats):
        for row in rows:
            left = ns.budget - (time.perf_counter() - started)
            if left < 20:
                if repeat == 0:
                    runs[row].append({"row": row, "error": f"skipped: the run's {ns.budget} s budget is spent"})
                continue
            result_path = workdir / "result.json"
            result_path.unlink(missing_ok=True)
            cap = min(ns.cap, left - 5)
            t = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", row, "--spec", str(spec_path),
                     "--result", str(result_path)],
                    env=env, capture_output=True, text=True, timeout=cap,
                )  # fmt: skip
                if result_path.exists():
                    result = json.loads(result_path.read_text())
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    result = {"row": row, "error": f"exit {proc.returncode}: " + " / ".join(tail)}
            except subprocess.TimeoutExpired:
                result = {"row": row, "error": f"timed out after {cap:.0f} s"}
            result["wall_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps(result), flush=True)
            runs[row].append(result)
            report["rows"] = summarize(runs)
            write(report, Path(ns.out))  # after every run: a cut run keeps what it measured
    report["rows"] = summarize(runs)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write(report, Path(ns.out))
    print(markdown(report))


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One entry per row: its median run (by real tokens/s) with the spread over runs, or its first error; then
    MFU, and the ratios to the raw limit and to the peer of the same shape, all from this run."""
    rows = []
    for results in runs.values():
        good = sorted((r for r in results if "error" not in r), key=lambda r: r["real_tokens_per_s"])
        if not good:
            if results:
                rows.append(dict(results[0]))
            continue
        entry = dict(good[(len(good) - 1) // 2])
        speeds = [r["real_tokens_per_s"] for r in good]
        entry["spread"] = {"min": speeds[0], "median": entry["real_tokens_per_s"], "max": speeds[-1],
                           "runs": len(good)}  # fmt: skip
        entry["runs"] = [
            {k: r.get(k) for k in ("real_tokens_per_s", "step_s", "peak_mem_GiB", "wall_s")} for r in good
        ]
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            entry["failed_runs"] = failed
        rows.append(entry)
    by = {r["row"]: r for r in rows if "error" not in r}
    raw = {(r["arch"], r["shape"]): r for r in by.values() if r["tool"] == "raw"}
    peers = {(r["arch"], r["shape"]): r for r in by.values()
             if (r["tool"] == "fe" and r["options"].get("unified")) or (r["tool"] == "st" and r["arch"] == "qwen"
                                                                         and not r["options"].get("cached"))}  # fmt: skip
    for r in by.values():
        if r["tool"] == "raw":
            continue
        limit = raw.get((r["arch"], r["shape"])) or raw.get((r["arch"], f"{B}x{G}"))
        if limit:
            r["x_raw_limit"] = round(r["real_tokens_per_s"] / limit["real_tokens_per_s"], 2)
        peer = peers.get((r["arch"], r["shape"])) or peers.get((r["arch"], f"{B}x{G}"))
        if peer and peer is not r and peer["real_tokens_per_s"]:
            r["x_peer"] = round(r["real_tokens_per_s"] / peer["real_tokens_per_s"], 2)
            if r.get("peak_mem_GiB") and peer.get("peak_mem_GiB"):
                r["mem_vs_peer"] = round(r["peak_mem_GiB"] / peer["peak_mem_GiB"], 2)
    return rows


def write(report: dict, out: Path) -> None:
    if report.get("matmul_peak_tflops"):
        for r in report["rows"]:
            if "tflops" in r:
                r["mfu"] = round(r["tflops"] / report["matmul_peak_tflops"], 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, 2 steps (a check, not a measurement)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 30; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; tiny 0)")
    parser.add_argument("--cap", type=float, default=75.0, help="seconds per row")
    parser.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run; later rows skip")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these")
    parser.add_argument("--core", action="store_true", help="only the core rows (CORE_ROWS; what gpu_check.py runs)")
    parser.add_argument(
        "--repeats", type=int, default=3,
        help="runs of each row, each in a fresh process, all rows once before any repeat (default 3)",
    )  # fmt: skip
    parser.add_argument("--out", default="bench/results/throughput_h200")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        child(ns.child, ns.spec, ns.result)
        return
    ns.steps = ns.steps or (2 if ns.tiny else 30)
    ns.warmup = ns.warmup if ns.warmup is not None else (0 if ns.tiny else 5)
    parent(ns)


if __name__ == "__main__":
    main()
