"""Parity of ark_hf's InfoNCE losses with ms-swift's `InfonceLoss` (`swift/loss/embedding.py`).

Runs in ms-swift's own environment (a separate venv: ms-swift pins its own transformers), with /work/main
on PYTHONPATH so that `ark_hf.losses.infonce` (torch only) is importable without installing ark_hf:

    python3 -m venv .bench/swift-venv
    .bench/swift-venv/bin/pip install torch==2.13.0 ms-swift
    PYTHONPATH=$PWD .bench/swift-venv/bin/python bench/swift_infonce_parity.py \
        --out bench/results/swift_infonce_parity.json

The same seeded, L2-normalised float64 embeddings (B queries, each with 1 positive and G-1 hard negatives)
go to ms-swift's loss (rows laid out `[anchor, positive, neg_1..neg_n]` per sample, `labels` = `[1, 0..0]`
per sample, switches through the `INFONCE_*` environment variables, which it reads at call time) and to
`qwen3_infonce_loss` / `InfoNCELoss` with the matching switches. Loss values and gradients w.r.t. the
query and document embeddings are compared for each setting and temperature.

By-design cases:
  (g) a copy of query 0's positive among another sample's hard negatives: ms-swift masks the positive by
      index only and keeps the copy as a negative (q-d and d-d terms); ark_hf masks it by content hash.
  (h) cross-device, a 2-process gloo run with DistributedDataParallel: both losses against the
      single-process global-batch gradient.
Also written: a Markdown summary next to the JSON file (same name, `.md`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ark_hf.losses.infonce import InfoNCELoss
from ark_hf.losses.qwen3 import qwen3_infonce_loss

B, G, DIM = 8, 4, 64  # queries, documents per query (positive + 3 hard negatives), embedding size
N_NEG = G - 1
SEED = 1234
TEMPERATURES = (0.1, 0.05)
MARGIN = 0.1
TOL = 1e-6
TOL_FLOAT32 = 1e-5  # float32 rows (rounding of exp(s / 0.05))
WORLD = 2  # processes of the cross-device case
ENV_KEYS = (
    "INFONCE_TEMPERATURE",
    "INFONCE_USE_BATCH",
    "INFONCE_HARD_NEGATIVES",
    "INFONCE_MASK_FAKE_NEGATIVE",
    "INFONCE_FAKE_NEG_MARGIN",
    "INFONCE_INCLUDE_QQ",
    "INFONCE_INCLUDE_DD",
)


# --------------------------------------------------------------------------------------------- settings

# name -> (description, ms-swift env (besides temperature), ark_hf qwen3_infonce_loss switches, InfoNCELoss kwargs)
SETTINGS = {
    "a": (
        "in-batch + hard negatives, no mask, no q-q/d-d",
        {"INFONCE_USE_BATCH": "True"},
        {"use_qq": False, "use_dd": False, "use_inbatch_qd": True, "mask_false_negatives": False},
        {"in_batch": True},
    ),
    "b": (
        "(a) + q-q (INFONCE_INCLUDE_QQ)",
        {"INFONCE_USE_BATCH": "True", "INFONCE_INCLUDE_QQ": "True"},
        {"use_qq": True, "use_dd": False, "use_inbatch_qd": True, "mask_false_negatives": False},
        None,
    ),
    "c": (
        "(a) + d-d (INFONCE_INCLUDE_DD)",
        {"INFONCE_USE_BATCH": "True", "INFONCE_INCLUDE_DD": "True"},
        {"use_qq": False, "use_dd": True, "use_inbatch_qd": True, "mask_false_negatives": False},
        None,
    ),
    "d": (
        "(a) + q-q + d-d",
        {"INFONCE_USE_BATCH": "True", "INFONCE_INCLUDE_QQ": "True", "INFONCE_INCLUDE_DD": "True"},
        {"use_qq": True, "use_dd": True, "use_inbatch_qd": True, "mask_false_negatives": False},
        None,
    ),
    "e": (
        "(d) + false-negative mask, margin 0.1 (INFONCE_MASK_FAKE_NEGATIVE)",
        {
            "INFONCE_USE_BATCH": "True",
            "INFONCE_INCLUDE_QQ": "True",
            "INFONCE_INCLUDE_DD": "True",
            "INFONCE_MASK_FAKE_NEGATIVE": "True",
            "INFONCE_FAKE_NEG_MARGIN": str(MARGIN),
        },
        {"use_qq": True, "use_dd": True, "use_inbatch_qd": True, "mask_false_negatives": True},
        None,
    ),
    "e2": (
        "(a) + false-negative mask only, margin 0.1 (extra)",
        {"INFONCE_USE_BATCH": "True", "INFONCE_MASK_FAKE_NEGATIVE": "True", "INFONCE_FAKE_NEG_MARGIN": str(MARGIN)},
        {"use_qq": False, "use_dd": False, "use_inbatch_qd": True, "mask_false_negatives": True},
        None,
    ),
    "f": (
        "own group only (INFONCE_USE_BATCH=False)",
        {"INFONCE_USE_BATCH": "False"},
        {"use_qq": False, "use_dd": False, "use_inbatch_qd": False, "mask_false_negatives": False},
        {"in_batch": False},
    ),
    "f2": (
        "(f) with INCLUDE_QQ/DD and MASK also set: ms-swift ignores them without USE_BATCH (extra)",
        {
            "INFONCE_USE_BATCH": "False",
            "INFONCE_INCLUDE_QQ": "True",
            "INFONCE_INCLUDE_DD": "True",
            "INFONCE_MASK_FAKE_NEGATIVE": "True",
        },
        {"use_qq": False, "use_dd": False, "use_inbatch_qd": False, "mask_false_negatives": False},
        {"in_batch": False},
    ),
}


# ------------------------------------------------------------------------------------------------- data


def make_embeddings(seed: int = SEED, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised queries `[B, DIM]` and documents `[B * G, DIM]` (query b's group at rows b*G.., positive first).

    Built so that every mask rule fires: queries come in pairs sharing a topic (q-q scores up to ~0.7),
    positives are at varied distances from their query, and samples 1 and 4 carry a near-copy of the
    query among their hard negatives (an unlabelled positive above s(q, d+) + 0.1).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    topics = randn(B // 2, DIM).repeat_interleave(2, dim=0)
    queries = F.normalize(topics + 0.6 * randn(B, DIM), dim=-1)
    docs = torch.empty(B, G, DIM, dtype=torch.float64)
    pos_noise = 0.12 + 0.13 * torch.rand(B, generator=g, dtype=torch.float64)  # per-dimension noise scale
    docs[:, 0] = queries + pos_noise[:, None] * randn(B, DIM)
    docs[:, 1] = queries + 0.18 * randn(B, DIM)  # hard negative
    docs[:, 2] = randn(B, DIM)  # random negative
    docs[:, 3] = topics + 1.2 * randn(B, DIM)  # same-topic negative
    docs[[1, 4], 3] = queries[[1, 4]] + 0.03 * randn(2, DIM)  # false negatives
    docs = F.normalize(docs, dim=-1).reshape(B * G, DIM)
    return queries.to(dtype), docs.to(dtype)


def swift_layout(queries: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ms-swift's collator layout: rows `[anchor, positive, neg_1..neg_n]` per sample, labels `[1, 0..0]` (no anchor)."""
    n, d = queries.shape
    group = docs.size(0) // n
    sentences = torch.cat([queries[:, None, :], docs.view(n, group, d)], dim=1).reshape(n * (group + 1), d)
    labels = torch.tensor(([1.0] + [0.0] * (group - 1)) * n)
    return sentences, labels


# ---------------------------------------------------------------------------------------------- ms-swift


class _Trainer:  # BaseLoss only inspects the trainer's class MRO (for Megatron)
    pass


def swift_loss_fn():
    from swift.loss.embedding import InfonceLoss

    return InfonceLoss(args=None, trainer=_Trainer())


@contextmanager
def infonce_env(env: dict[str, str]):
    """Set exactly these INFONCE_* variables (the others unset) and restore the previous values."""
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    for k in ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call_swift(loss_fn, queries, docs, env):
    sentences, labels = swift_layout(queries, docs)
    with infonce_env(env):
        return loss_fn({"last_hidden_state": sentences}, labels)


def loss_and_grads(fn, queries, docs):
    q = queries.detach().clone().requires_grad_(True)
    d = docs.detach().clone().requires_grad_(True)
    out = fn(q, d)
    loss, extra = out if isinstance(out, tuple) else (out, None)
    gq, gd = torch.autograd.grad(loss, (q, d))
    return loss.detach(), gq, gd, extra


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def mask_counts(queries, docs, margin=MARGIN):
    """Entries removed by the threshold rule, per block (computed independently of both libraries)."""
    s_qd = queries @ docs.T
    rows = torch.arange(queries.size(0))
    pos_cols = rows * G
    thr = s_qd[rows, pos_cols][:, None] + margin
    own = torch.zeros_like(s_qd, dtype=torch.bool)
    for b in range(queries.size(0)):
        own[b, b * G : (b + 1) * G] = True
    over = s_qd > thr
    s_qq = queries @ queries.T
    qq_over = (s_qq > thr) & ~torch.eye(queries.size(0), dtype=torch.bool)
    return {
        "qd_own_group": int((over & own).sum()),
        "qd_other_groups": int((over & ~own).sum()),
        "qq": int(qq_over.sum()),
    }


# ------------------------------------------------------------------------------------ single-process runs


def run_setting(swift_fn, name, temperature, dtype):
    desc, env, ark_kw, infonce_kw = SETTINGS[name]
    env = {**env, "INFONCE_TEMPERATURE": str(temperature), "INFONCE_HARD_NEGATIVES": str(N_NEG)}
    queries, docs = make_embeddings(dtype=dtype)

    ls, gqs, gds, _ = loss_and_grads(lambda q, d: call_swift(swift_fn, q, d, env), queries, docs)
    la, gqa, gda, stats = loss_and_grads(
        lambda q, d: qwen3_infonce_loss(q, d, G, temperature=temperature, false_negative_margin=MARGIN, **ark_kw),
        queries,
        docs,
    )
    # ms-swift without INFONCE_HARD_NEGATIVES (equal group sizes also take its batched path).
    env_nohn = {k: v for k, v in env.items() if k != "INFONCE_HARD_NEGATIVES"}
    ls_nohn = call_swift(swift_fn, queries, docs, env_nohn).detach()
    row = {
        "setting": name,
        "description": desc,
        "temperature": temperature,
        "dtype": str(dtype).replace("torch.", ""),
        "swift_env": env,
        "ark_call": f"qwen3_infonce_loss(query, docs, {G}, temperature={temperature}, false_negative_margin={MARGIN}, "
        + ", ".join(f"{k}={v}" for k, v in ark_kw.items())
        + ")",
        "loss_swift": float(ls),
        "loss_ark": float(la),
        "loss_abs_diff": abs(float(ls - la)),
        "max_grad_diff_query": max_abs(gqs, gqa),
        "max_grad_diff_docs": max_abs(gds, gda),
        "max_grad_abs": float(torch.cat([gqs.flatten(), gds.flatten()]).abs().max()),
        "ark_stats": {k: int(v) for k, v in stats.items()},
        "swift_without_HARD_NEGATIVES_abs_diff": abs(float(ls_nohn - ls)),
    }
    if infonce_kw is not None:
        li, gqi, gdi, _ = loss_and_grads(lambda q, d: InfoNCELoss(temperature, **infonce_kw)(q, d)[0], queries, docs)
        row["ark_InfoNCELoss_call"] = f"InfoNCELoss(temperature={temperature}, {infonce_kw})"
        row["loss_ark_InfoNCELoss"] = float(li)
        row["InfoNCELoss_loss_abs_diff"] = abs(float(ls - li))
        row["InfoNCELoss_max_grad_diff"] = max(max_abs(gqs, gqi), max_abs(gds, gdi))
    worst = max(
        row["loss_abs_diff"],
        row["max_grad_diff_query"],
        row["max_grad_diff_docs"],
        row.get("InfoNCELoss_loss_abs_diff", 0.0),
        row.get("InfoNCELoss_max_grad_diff", 0.0),
    )
    tol = TOL if dtype == torch.float64 else TOL_FLOAT32
    row["max_diff"] = worst
    row["verdict"] = f"equal to {tol:g}" if worst <= tol else f"DIFFERS (max diff {worst:.3g})"
    return row


def run_duplicate(swift_fn, temperature):
    """(g): query 0's positive copied over a hard negative of sample 5 (identical embedding and text hash)."""
    _, env, ark_kw, _ = SETTINGS["e"]
    env = {**env, "INFONCE_TEMPERATURE": str(temperature), "INFONCE_HARD_NEGATIVES": str(N_NEG)}
    queries, docs = make_embeddings()
    dup = 5 * G + 2
    docs[dup] = docs[0]
    hashes = torch.arange(B * G)
    hashes[dup] = hashes[0]

    ls, gqs, gds, _ = loss_and_grads(lambda q, d: call_swift(swift_fn, q, d, env), queries, docs)

    def ark(h):
        return lambda q, d: qwen3_infonce_loss(
            q, d, G, temperature=temperature, false_negative_margin=MARGIN, doc_hashes=h, **ark_kw
        )

    lh, gqh, gdh, st_h = loss_and_grads(ark(hashes), queries, docs)
    ln, gqn, gdn, st_n = loss_and_grads(ark(None), queries, docs)
    s_qd = float(queries[0] @ docs[dup])
    s_pos = float(queries[0] @ docs[0])
    nohash_diff = max(abs(float(ls - ln)), max_abs(gqs, gqn), max_abs(gds, gdn))
    return {
        "setting": "g",
        "description": "(e) with a copy of query 0's positive as sample 5's 2nd hard negative (doc row "
        f"{dup}); ark_hf gets doc_hashes with hash[{dup}] == hash[0]",
        "temperature": temperature,
        "dtype": "float64",
        "swift_env": env,
        "loss_swift": float(ls),
        "loss_ark": float(lh),
        "loss_ark_without_hashes": float(ln),
        "loss_abs_diff": abs(float(ls - lh)),
        "max_grad_diff_query": max_abs(gqs, gqh),
        "max_grad_diff_docs": max_abs(gds, gdh),
        "ark_without_hashes_vs_swift_max_diff": nohash_diff,
        "ark_stats_with_hashes": {k: int(v) for k, v in st_h.items()},
        "ark_stats_without_hashes": {k: int(v) for k, v in st_n.items()},
        "s(q0, copy) = s(q0, d0+)": [s_qd, s_pos],
        "s(d0+, copy)": float(docs[0] @ docs[dup]),
        "verdict": "differs by design: ms-swift masks the positive by index only, so the copy stays a negative "
        "of query 0 in the q-d term (s = s(q,d+), below the +0.1 threshold) and in the d-d term (s(d+,copy) = 1, "
        "never threshold-masked); ark_hf masks both by content hash (report: m_ij = 0 when d_j == d_i+). "
        + (
            f"Without doc_hashes ark_hf equals ms-swift to {TOL:g}."
            if nohash_diff <= TOL
            else f"WARNING: without doc_hashes ark_hf differs from ms-swift by {nohash_diff:.3g}."
        ),
    }


# --------------------------------------------------------------------------------------- cross-device (h)

IN_DIM = DIM


class _Encoder(nn.Module):
    """Linear map (identity + small noise) then L2 normalisation, one forward for queries and documents."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.linear = nn.Linear(IN_DIM, DIM, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(DIM, dtype=torch.float64))
            self.linear.weight.add_(0.05 * torch.randn(DIM, DIM, generator=g, dtype=torch.float64))

    def forward(self, queries, docs):
        return F.normalize(self.linear(queries), dim=-1), F.normalize(self.linear(docs), dim=-1)


def _xdev_losses(temperature):
    """name -> fn(q, d, hashes) -> loss. Same function with world_size 1 (global batch) or 2 (per rank)."""
    _, env, ark_kw, _ = SETTINGS["e"]
    env = {**env, "INFONCE_TEMPERATURE": str(temperature), "INFONCE_HARD_NEGATIVES": str(N_NEG)}
    _, env_a, ark_kw_a, _ = SETTINGS["a"]
    env_a = {**env_a, "INFONCE_TEMPERATURE": str(temperature), "INFONCE_HARD_NEGATIVES": str(N_NEG)}
    swift_fn = swift_loss_fn()

    def ark(kw):
        return lambda q, d, h, xdev: qwen3_infonce_loss(
            q, d, G, temperature=temperature, false_negative_margin=MARGIN, cross_device=xdev, **kw
        )[0]

    return {
        "swift_a": lambda q, d, h, xdev: call_swift(swift_fn, q, d, env_a),
        "ark_a": ark(ark_kw_a),
        "swift_e": lambda q, d, h, xdev: call_swift(swift_fn, q, d, env),
        "ark_e": ark(ark_kw),
    }


def _xdev_run(losses, queries, docs, hashes, xdev, wrap=lambda m: m):
    out = {}
    for name, fn in losses.items():
        encoder = wrap(_Encoder())
        q, d = encoder(queries, docs)
        q.retain_grad()
        d.retain_grad()
        loss = fn(q, d, hashes, xdev)
        loss.backward()
        out[name] = {
            "loss": loss.detach(),
            "param_grad": next(encoder.parameters()).grad.clone(),
            "emb_grad_q": q.grad.clone(),
            "emb_grad_d": d.grad.clone(),
        }
    return out


def _xdev_worker(local_rank, port, out_dir, temperature):
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    from accelerate import PartialState
    from torch.nn.parallel import DistributedDataParallel

    state = PartialState(cpu=True)  # initialises gloo; ms-swift's gather_object goes through accelerate
    assert state.num_processes == WORLD and dist.get_rank() == local_rank, state
    try:
        queries, docs = make_embeddings()
        bl = B // WORLD
        rows = slice(local_rank * bl, (local_rank + 1) * bl)
        drows = slice(local_rank * bl * G, (local_rank + 1) * bl * G)
        res = _xdev_run(
            _xdev_losses(temperature), queries[rows], docs[drows], None, True, wrap=DistributedDataParallel
        )
        res["distributed_type"] = str(state.distributed_type)
        torch.save(res, Path(out_dir) / f"rank{local_rank}.pt")
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cross_device(temperature=0.1):
    assert "WORLD_SIZE" not in os.environ, "run the script in one process; it spawns the gloo workers itself"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_xdev_worker, args=(_free_port(), tmp, temperature), nprocs=WORLD, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    queries, docs = make_embeddings()
    single = _xdev_run(_xdev_losses(temperature), queries, docs, None, False)
    rows = []
    for name in ("swift_a", "ark_a", "swift_e", "ark_e"):
        want = single[name]
        # DDP averages parameter gradients over ranks; every rank holds that average after backward.
        pg = [r[name]["param_grad"] for r in ranks]
        emb_q = torch.cat([r[name]["emb_grad_q"] for r in ranks])
        emb_d = torch.cat([r[name]["emb_grad_d"] for r in ranks])
        rank_losses = [float(r[name]["loss"]) for r in ranks]
        param_diff = max(max_abs(p, want["param_grad"]) for p in pg)
        ratio = float((pg[0] * want["param_grad"]).sum() / (want["param_grad"] ** 2).sum())
        # Per-rank embedding gradients are W x the global-batch gradient of those embeddings (DDP divides by W).
        emb_diff = max(max_abs(emb_q / WORLD, want["emb_grad_q"]), max_abs(emb_d / WORLD, want["emb_grad_d"]))
        rows.append(
            {
                "loss": name,
                "temperature": temperature,
                "loss_single_process_global_batch": float(want["loss"]),
                "rank_losses": rank_losses,
                "mean_rank_loss": sum(rank_losses) / WORLD,
                "max_param_grad_diff_vs_global": param_diff,
                "param_grad_ratio_vs_global": ratio,
                "max_emb_grad_diff_vs_global (rank emb grad / W)": emb_diff,
                "distributed_type": ranks[0]["distributed_type"],
                "verdict": f"equal to {TOL:g}" if param_diff <= TOL else f"DIFFERS (max diff {param_diff:.3g})",
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ report


def versions():
    def v(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    import swift.loss.embedding as emb

    src = Path(emb.__file__)
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "ms-swift": v("ms-swift"),
        "torch": torch.__version__,
        "transformers": v("transformers"),
        "accelerate": v("accelerate"),
        "peft": v("peft"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "swift_embedding_py": str(src),
        "swift_embedding_py_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "ark_hf_commit": commit,
        "ark_hf_infonce_py_sha256": hashlib.sha256(
            (Path(__file__).resolve().parents[1] / "ark_hf/losses/infonce.py").read_bytes()
        ).hexdigest(),
    }


def fmt(x):
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def markdown(result):
    v = result["versions"]
    lines = [
        "# ms-swift InfonceLoss vs ark_hf qwen3_infonce_loss: parity",
        "",
        f"ms-swift {v['ms-swift']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}, Python {v['python']}; ark_hf commit `{(v['ark_hf_commit'] or '?')[:12]}`.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Data: B={B} queries, {N_NEG} hard negatives each, d={DIM}, seed {SEED}, L2-normalised; float64 unless "
        "noted. Grad diff = max |d loss / d embedding| difference over queries and documents; float32 column = "
        "the largest loss/grad difference of the same setting in float32.",
        "",
        f"Threshold-mask hits in the data (margin {MARGIN}): {result['mask_hits']}.",
        "",
        "| setting | description | τ | loss ms-swift | loss ark_hf | abs diff loss | max grad diff | float32 max diff"
        " | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f32 = {(r["setting"], r["temperature"]): r["max_diff"] for r in result["settings_float32"]}
    for r in result["settings"]:
        gd = max(r["max_grad_diff_query"], r["max_grad_diff_docs"])
        lines.append(
            f"| {r['setting']} | {r['description']} | {r['temperature']} | {r['loss_swift']:.10f} | "
            f"{r['loss_ark']:.10f} | {fmt(r['loss_abs_diff'])} | {fmt(gd)} | {fmt(f32[(r['setting'], r['temperature'])])}"
            f" | {r['verdict']} |"
        )
    for r in result["duplicate"]:
        gd = max(r["max_grad_diff_query"], r["max_grad_diff_docs"])
        lines.append(
            f"| g | copy of q0's positive as another sample's negative (setting e) | {r['temperature']} | "
            f"{r['loss_swift']:.10f} | {r['loss_ark']:.10f} (without hashes: {r['loss_ark_without_hashes']:.10f}) | "
            f"{fmt(r['loss_abs_diff'])} | {fmt(gd)} | – | differs by design (see below); ark_hf without hashes vs "
            f"ms-swift: {fmt(r['ark_without_hashes_vs_swift_max_diff'])} |"
        )
    lines += [
        "",
        "(a) and (f) are also checked against `InfoNCELoss(in_batch=True/False)`: "
        + ", ".join(
            f"{r['setting']}/τ={r['temperature']}: {fmt(r['InfoNCELoss_max_grad_diff'])}"
            for r in result["settings"]
            if "InfoNCELoss_max_grad_diff" in r
        )
        + " (max grad diff). ms-swift with and without `INFONCE_HARD_NEGATIVES` set gives the same loss in every "
        f"setting (largest difference {fmt(max(r['swift_without_HARD_NEGATIVES_abs_diff'] for r in result['settings']))}).",
        "",
        "## (g) duplicate of a positive",
        "",
        result["duplicate"][0]["verdict"],
        "",
        f"ark_hf mask counts at τ={result['duplicate'][0]['temperature']}: with hashes "
        f"{result['duplicate'][0]['ark_stats_with_hashes']}, without {result['duplicate'][0]['ark_stats_without_hashes']}"
        " (the copy is removed from query 0's q-d and d-d terms).",
        "",
        f"## (h) cross-device, {WORLD}-process gloo + DistributedDataParallel",
        "",
        "Each rank holds half of the samples; the DDP-averaged parameter gradient of a linear+normalise encoder is "
        "compared with the single-process gradient on the whole batch.",
        "",
        "| loss | global-batch loss | rank losses | max param grad diff | grad ratio | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["cross_device"]:
        lines.append(
            f"| {r['loss']} | {r['loss_single_process_global_batch']:.10f} | "
            f"{', '.join(f'{x:.6f}' for x in r['rank_losses'])} | {fmt(r['max_param_grad_diff_vs_global'])} | "
            f"{r['param_grad_ratio_vs_global']:.6f} | {r['verdict']} |"
        )
    lines += ["", *result["notes"], ""]
    return "\n".join(lines)


NOTES = [
    "## Notes",
    "",
    "- ms-swift reads every `INFONCE_*` variable at call time (in `InfonceLoss.__call__`), not at import.",
    "- Term sets. ms-swift's base block `queries @ docs_all.T` = report terms (1)+(2)+(5); `INCLUDE_QQ` adds "
    "`queries @ queries.T` with the diagonal at -inf (term 3); `INCLUDE_DD` adds `pos_docs @ docs_all.T` with each "
    "row's own-positive column at -inf (term 4). ark_hf's d-d term is d_i+ against every batch document except "
    "d_i+ itself (own hard negatives included), i.e. the same set: settings c/d/e agree to float64 rounding.",
    "- d-d masking. Neither applies the threshold rule to d-d (the report defines it for q-d and q-q scores). "
    "ms-swift removes only the own-positive column (index); ark_hf also removes copies of d_i+ by content hash "
    "(report: m_ij = 0 when d_j == d_i+), which is the (g) difference.",
    "- Threshold: both use s(q_i, d_i+).detach() + margin on raw cosine, applied to the q-d block (own hard "
    "negatives included) and the q-q block.",
    "- `INFONCE_USE_BATCH=False`: ms-swift computes CE over the own [pos, negs] only and ignores INCLUDE_QQ/DD and "
    "MASK (row f2). The ark_hf equivalent is `InfoNCELoss(in_batch=False)` or `qwen3_infonce_loss` with "
    "use_inbatch_qd, use_qq and use_dd all False (and no mask). Note that `use_inbatch_qd=False` alone does not "
    "switch off ark_hf's q-q and d-d terms (its d-d then still covers all batch documents).",
    "- `INFONCE_HARD_NEGATIVES` padding: this ms-swift release resamples with `selected += 2` (skips anchor and "
    "positive); the older `+= 1` (which could pick the positive as a negative) is fixed here. Not exercised: "
    "all samples have 3 negatives.",
    "- Cross-device. ms-swift gathers every rank's embeddings with `accelerate.utils.gather_object` (no autograd), "
    "puts the local slice back with its graph and detaches the others, so each rank computes the *global* loss "
    "with gradients through its local embeddings only. ms-swift 4.6.0 then multiplies the gradient by the world "
    "size (`gradient_scale = len(all_sentences)`; `loss = loss.detach() + W * (loss - loss.detach())`), which "
    "exactly compensates DDP's 1/W average: the DDP-averaged gradient equals the global-batch gradient (row "
    "h, ratio 1). Releases without that line (ms-swift 3.x `swift/plugin/loss.py::infonce_loss`, and the "
    "4.x code before it was added) give 1/W of the global gradient, like FlagEmbedding. ark_hf gathers with "
    "gradient (`all_gather_with_grad`) and each rank takes the mean over its own queries; it also equals the "
    "global-batch gradient (tests/test_distributed.py and row h). Differences that remain: ms-swift's per-rank "
    "loss value is the global loss on every rank (ark_hf: each rank's own queries; the mean over ranks is the "
    "global loss), and every ms-swift rank computes the full global score matrix (W times the loss compute). "
    "The Megatron path with `calculate_per_token_loss=True` skips the W factor because Megatron sums there. "
    "In training, ms-swift's `Trainer.compute_loss` calls transformers' `compute_loss` without "
    "`num_items_in_batch`, so transformers' `average_tokens_across_devices` loss x num_processes does not "
    "stack on top of the W factor (read from the code, not run).",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/swift_infonce_parity.json")
    parser.add_argument("--skip-cross-device", action="store_true", help="skip the 2-process gloo case (h)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()

    swift_fn = swift_loss_fn()
    settings, settings_f32 = [], []
    for temperature in TEMPERATURES:
        for name in SETTINGS:
            settings.append(run_setting(swift_fn, name, temperature, torch.float64))
            settings_f32.append(run_setting(swift_fn, name, temperature, torch.float32))
    duplicate = [run_duplicate(swift_fn, t) for t in TEMPERATURES]
    cross_device = [] if args.skip_cross_device else run_cross_device(0.1)

    pythonpath = os.environ.get("PYTHONPATH", "")
    result = {
        "benchmark": "ms-swift InfonceLoss vs ark_hf qwen3_infonce_loss / InfoNCELoss parity",
        "command": f"PYTHONPATH={pythonpath} {sys.executable} {' '.join(shlex.quote(a) for a in sys.argv)}",
        "versions": versions(),
        "data": {"B": B, "hard_negatives": N_NEG, "dim": DIM, "seed": SEED, "margin": MARGIN, "tolerance": TOL},
        "mask_hits": mask_counts(*make_embeddings()),
        "settings": settings,
        "settings_float32": settings_f32,
        "duplicate": duplicate,
        "cross_device": cross_device,
        "notes": NOTES,
        "all_parity_settings_equal": all(r["max_diff"] <= TOL for r in settings),
        "wall_seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
