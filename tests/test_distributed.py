"""Cross-device losses on 2 CPU processes (gloo) equal the single-process loss on the concatenated batch.

Each rank embeds its half of the queries and passages with a DistributedDataParallel encoder and computes
a cross-device loss; the mean of the rank losses must equal the single-process loss on the whole batch,
and the DDP-averaged parameter gradients its gradients. Dropping the cross-rank gradients or computing
the global loss on every rank (the usual shortcuts) fails the gradient check by a factor of the world size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.infonce import InfoNCELoss
from ark_hf.losses.m3 import M3Loss
from ark_hf.losses.qwen3 import qwen3_infonce_loss
from ark_hf.models.outputs import EmbeddingOutput
from ark_hf.utils.distributed import all_gather_padded, all_gather_with_grad, rank, world_size

WORLD, BATCH, GROUP, IN_DIM, DIM = 2, 3, 3, 6, 4


class _Encoder(nn.Module):
    """One forward for queries and passages, as a retriever's forward under DDP."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(IN_DIM, DIM, dtype=torch.float64)

    def forward(self, queries, passages):
        return F.normalize(self.linear(queries), dim=-1), F.normalize(self.linear(passages), dim=-1)


def _data():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(WORLD * BATCH, IN_DIM, generator=g, dtype=torch.float64)
    passages = torch.randn(WORLD * BATCH * GROUP, IN_DIM, generator=g, dtype=torch.float64)
    passages[::GROUP] = queries + 0.8 * torch.randn(WORLD * BATCH, IN_DIM, generator=g, dtype=torch.float64)
    hashes = torch.arange(WORLD * BATCH * GROUP)
    # A copy of rank 0's first positive among rank 1's hard negatives: the hash mask must work across ranks.
    duplicate = BATCH * GROUP + 1
    passages[duplicate] = passages[0]
    hashes[duplicate] = hashes[0]
    teacher = torch.randn(WORLD * BATCH, GROUP, generator=g, dtype=torch.float64)
    return queries, passages, hashes, teacher


def _losses(cross_device: bool):
    """name -> fn(queries, passages, hashes, teacher) -> (loss, stats), with or without cross-device negatives."""
    return {
        "infonce": lambda q, p, h, t: (InfoNCELoss(temperature=0.05, cross_device=cross_device)(q, p)[0], {}),
        "qwen3": lambda q, p, h, t: qwen3_infonce_loss(q, p, GROUP, doc_hashes=h, cross_device=cross_device),
        "m3_dense_kd": lambda q, p, h, t: (
            M3Loss(unified_finetuning=False, negatives_cross_device=cross_device, kd_loss_type="m3_kd_loss")(
                EmbeddingOutput(dense=q), EmbeddingOutput(dense=p), RetrievalBatch(GROUP, teacher_scores=t)
            )[0],
            {},
        ),
    }


def _run(losses, queries, passages, hashes, teacher, wrap=lambda m: m):
    """Loss, stats and parameter gradients of each loss on the given batch, from the same initial encoder."""
    results = {}
    for name, loss_fn in losses.items():
        torch.manual_seed(0)
        encoder = wrap(_Encoder())
        q, p = encoder(queries, passages)
        loss, stats = loss_fn(q, p, hashes, teacher)
        loss.backward()
        results[name] = {
            "loss": loss.detach(),
            "stats": {k: v.detach() for k, v in stats.items()},
            "grads": [param.grad.clone() for param in encoder.parameters()],
        }
    return results


def _worker(local_rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        assert (world_size(), rank()) == (WORLD, local_rank)
        queries, passages, hashes, teacher = _data()
        rows = slice(local_rank * BATCH, (local_rank + 1) * BATCH)
        docs = slice(local_rank * BATCH * GROUP, (local_rank + 1) * BATCH * GROUP)
        results = _run(
            _losses(cross_device=True),
            queries[rows],
            passages[docs],
            hashes[docs],
            teacher[rows],
            wrap=DistributedDataParallel,
        )

        # Ragged token-level tensors: rank r has 2 + r tokens; ids gathered without grad.
        tokens = (
            torch.arange(2 * (2 + local_rank) * 2, dtype=torch.float64).view(2, 2 + local_rank, 2) + 100 * local_rank
        )
        tokens.requires_grad_(True)
        gathered = all_gather_padded(tokens, dim=1, pad_value=-1.0)
        weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered)
        (gathered * weights).sum().backward()
        ids = all_gather_padded(torch.full((1, 1 + local_rank), 7 + local_rank), dim=-1, with_grad=False)
        results["padded"] = {"gathered": gathered.detach(), "grad": tokens.grad, "ids": ids}
        # Every rank's loss depends on every slice: the gradient of a slice sums over all ranks' losses.
        shared = torch.full((1, 2), float(local_rank + 1), dtype=torch.float64, requires_grad=True)
        (
            all_gather_with_grad(shared) * torch.tensor([[1.0], [10.0]], dtype=torch.float64) * (local_rank + 1)
        ).sum().backward()
        results["gather_grad"] = shared.grad
        torch.save(results, Path(out_dir) / f"rank{local_rank}.pt")
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cross_device_losses_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    queries, passages, hashes, teacher = _data()
    expected = _run(_losses(cross_device=False), queries, passages, hashes, teacher)
    # The single-process InfoNCE itself, written out: target of query b is passage b * G.
    torch.manual_seed(0)
    q, p = _Encoder()(queries, passages)
    infonce = F.cross_entropy(q @ p.T / 0.05, torch.arange(WORLD * BATCH) * GROUP)
    torch.testing.assert_close(expected["infonce"]["loss"], infonce.detach())

    for name, single in expected.items():
        mean_loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-10, atol=1e-10, msg=name)
        for r in ranks:
            for got, want in zip(r[name]["grads"], single["grads"]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
        for key, total in single["stats"].items():
            assert sum(int(r[name]["stats"][key]) for r in ranks) == int(total), (name, key)
    # The duplicate of rank 0's positive on rank 1 was masked (q-d and d-d terms of query 0).
    _, unhashed = qwen3_infonce_loss(q.detach(), p.detach(), GROUP)
    assert int(expected["qwen3"]["stats"]["masked"]) == int(unhashed["masked"]) + 2

    rank0, rank1 = ranks[0]["padded"], ranks[1]["padded"]
    assert rank0["gathered"].shape == (4, 3, 2)
    torch.testing.assert_close(rank0["gathered"], rank1["gathered"])
    tokens0 = torch.arange(8, dtype=torch.float64).view(2, 2, 2)
    tokens1 = torch.arange(12, dtype=torch.float64).view(2, 3, 2) + 100
    torch.testing.assert_close(rank0["gathered"][:2, :2], tokens0)
    assert (rank0["gathered"][:2, 2] == -1).all()
    torch.testing.assert_close(rank0["gathered"][2:], tokens1)
    weights = torch.arange(24, dtype=torch.float64).view(4, 3, 2)
    torch.testing.assert_close(rank0["grad"], WORLD * weights[:2, :2])  # both ranks' losses, padding dropped
    torch.testing.assert_close(rank1["grad"], WORLD * weights[2:])
    assert rank0["ids"].tolist() == [[7, 0], [8, 8]]
    # d/d(shared_r) of sum_s (s + 1) * (1 * shared_0 + 10 * shared_1) = (1 + 2) * [1, 10][r]
    assert ranks[0]["gather_grad"].tolist() == [[3.0, 3.0]]
    assert ranks[1]["gather_grad"].tolist() == [[30.0, 30.0]]
