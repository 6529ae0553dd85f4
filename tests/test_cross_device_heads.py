"""Cross-device negatives for the sparse and ColBERT heads (and the ensemble and self-distillation over the
global columns): on 2 CPU processes (gloo), the DDP-averaged gradients equal the single-process gradients on the
concatenated batch, float64 to 1e-10.

The ranks' passages have different token lengths (the gathers pad them), and a query on rank 0 has another
positive among rank 1's passages (the multi-positive mask works across ranks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.m3 import M3Loss
from ark_hf.models.outputs import EmbeddingOutput

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

WORLD, BATCH, GROUP, VOCAB, HIDDEN = 2, 2, 3, 12, 6
QUERY_LEN = 4
PASSAGE_LEN = (5, 7)  # per rank: the token dimension differs between ranks


class TinyM3(nn.Module):
    """BGE-M3's three heads on a bag-of-embeddings encoder (float64): CLS dense, relu sparse, normalised ColBERT."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64)
        self.mix = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)
        self.sparse = nn.Linear(HIDDEN, 1, dtype=torch.float64)
        self.colbert = nn.Linear(HIDDEN, HIDDEN, dtype=torch.float64)

    def forward(self, passages: dict[str, torch.Tensor]) -> EmbeddingOutput:
        ids, mask = passages["input_ids"], passages["attention_mask"]
        hidden = torch.tanh(self.mix(self.embed(ids)))
        hidden = hidden + (hidden * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        weights = torch.relu(self.sparse(hidden)).squeeze(-1) * mask
        weights = weights.masked_fill(ids == 0, 0.0)  # id 0 plays CLS: a special token has no lexical weight
        colbert = F.normalize(self.colbert(hidden[:, 1:]), dim=-1) * mask[:, 1:, None]
        return EmbeddingOutput(
            dense=F.normalize(hidden[:, 0], dim=-1),
            sparse_weights=weights,
            input_ids=ids,
            colbert=colbert,
            colbert_mask=mask[:, 1:],
        )


def _texts(n: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids (CLS = 0 first, padding id 1 after each text's length) with their attention mask."""
    ids = torch.randint(2, VOCAB, (n, length), generator=generator)
    ids[:, 0] = 0
    lengths = torch.randint(2, length + 1, (n,), generator=generator)
    lengths[0] = length  # the longest text sets the padded length, as a collator would
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def rank_data(r: int) -> dict:
    """Rank r's queries, passages, hashes and positive hashes (the same on every process)."""
    g = torch.Generator().manual_seed(100 + r)
    queries = _texts(BATCH, QUERY_LEN, g)
    passages = _texts(BATCH * GROUP, PASSAGE_LEN[r], g)
    hashes = torch.arange(BATCH * GROUP) + 1000 * r
    positives = torch.full((BATCH, 2), -1)
    positives[:, 0] = hashes[::GROUP]
    if r == 0:  # rank 0's query 1 has a second positive: rank 1's passage 4 (a hard negative of its query 1)
        positives[1, 1] = 1000 + 4
    return {"q": queries, "p": passages, "hashes": hashes, "positives": positives}


def concatenated() -> dict:
    """The global batch in one process: both ranks' texts, padded to the longest."""
    parts = [rank_data(r) for r in range(WORLD)]

    def cat(key: str, length: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, pad in (("input_ids", 1), ("attention_mask", 0)):
            out[name] = torch.cat([F.pad(d[key][name], (0, length - d[key][name].size(1)), value=pad) for d in parts])
        return out

    return {
        "q": cat("q", QUERY_LEN),
        "p": cat("p", max(PASSAGE_LEN)),
        "hashes": torch.cat([d["hashes"] for d in parts]),
        "positives": torch.cat([d["positives"] for d in parts]),
    }


CASES = {
    # the sparse head's loss alone (0.1 L_lex / 4), the only head gathered
    "sparse": dict(cross_device_heads=("sparse",), loss_weights=(0.0, 0.0, 1.0, 0.0)),
    # the ColBERT head's loss alone, chunked max-sim over the gathered passages
    "colbert": dict(cross_device_heads=("colbert",), loss_weights=(0.0, 0.0, 0.0, 1.0), colbert_chunk_size=3),
    # every head, ensemble and self-distillation over the global columns
    "unified_self_distill": dict(use_self_distill=True, colbert_chunk_size=5),
    # with teacher distillation (m3_kd_loss) on every head
    "m3_kd_loss": dict(use_self_distill=True, kd_loss_type="m3_kd_loss"),
}


def global_teacher() -> torch.Tensor:
    """Teacher scores `[W * B, G]` of the global batch (rank r's queries are rows r * B ...)."""
    first = torch.linspace(-1, 1, BATCH * GROUP, dtype=torch.float64).view(BATCH, GROUP)
    return torch.cat([first, first.flip(-1)])


def run_case(model: nn.Module, data: dict, kwargs: dict, teacher: torch.Tensor) -> tuple:
    """Loss, components and parameter gradients of `M3Loss(**kwargs)` with cross-device negatives on."""
    loss_fn = M3Loss(temperature=0.05, negatives_cross_device=True, **kwargs)
    batch = RetrievalBatch(
        GROUP,
        passage_hashes=data["hashes"],
        positive_hashes=data["positives"],
        teacher_scores=teacher if kwargs.get("kd_loss_type") else None,
    )
    model.zero_grad()
    output = loss_fn(model(data["q"]), model(data["p"]), batch, step=1)
    output.loss.backward()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return output.loss.detach(), output.components, [p.grad.clone() for p in inner.parameters()]


def _worker(local_rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        teacher = global_teacher()[local_rank * BATCH : (local_rank + 1) * BATCH]
        results = {}
        for name, kwargs in CASES.items():
            torch.manual_seed(0)
            loss, components, grads = run_case(
                DistributedDataParallel(TinyM3()), rank_data(local_rank), kwargs, teacher
            )
            results[name] = {"loss": loss, "components": components, "grads": grads}
        torch.save(results, Path(out_dir) / f"rank{local_rank}.pt")
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def single_process(kwargs: dict) -> tuple:
    torch.manual_seed(0)
    return run_case(TinyM3(), concatenated(), kwargs, global_teacher())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cross_device_heads")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_equal_single_process_on_concatenated_batch(ranks, case):
    loss, components, grads = single_process(CASES[case])
    mean_loss = torch.stack([r[case]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss, rtol=1e-10, atol=1e-10)
    for r in ranks:  # DDP averaged the parameter gradients: every rank holds the global-batch gradient
        for got, want in zip(r[case]["grads"], grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the other positive of rank 0's query 1 sits on rank 1: removed there on rank 0, as in one process
    assert int(components["masked_positives"]) == 1
    assert [int(r[case]["components"]["masked_positives"]) for r in ranks] == [1, 0]
    # the components of the gathered heads are global-batch values too (a head scored in-batch is not)
    keys = {"sparse": ["loss_lex"], "colbert": ["loss_mul"]}.get(
        case, ["loss_dense", "loss_lex", "loss_mul", "loss_inter"]
    )
    for key in keys:
        per_rank = torch.stack([r[case]["components"][key] for r in ranks]).mean()
        torch.testing.assert_close(per_rank, components[key], rtol=1e-10, atol=1e-10)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="cross_device_heads: unknown head"):
        M3Loss(cross_device_heads=("lexical",))
