"""GradCache under DDP with cross-device negatives on all three BGE-M3 heads (2 CPU processes, gloo, float64).

Each rank runs `GradCache.step` on its half of the batch (mini-batches of 2 texts, `no_sync` for all but the last
backward); the parameter gradients after the step equal those of one uncached process on the concatenated batch,
and DDP reduced the gradients exactly as often as in one uncached DDP step (once per step), counted by a comm hook.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_cross_device_heads import BATCH, GROUP, WORLD, TinyM3, concatenated, global_teacher, rank_data
from torch.nn.parallel import DistributedDataParallel

from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.cached import GradCache
from ark_hf.losses.m3 import M3Loss

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

MINI_BATCH = 2
CASES = {
    "unified_self_distill": dict(use_self_distill=True, colbert_chunk_size=4),
    "m3_kd_loss": dict(use_self_distill=True, kd_loss_type="m3_kd_loss"),
}


def make_loss(kwargs: dict) -> M3Loss:
    return M3Loss(temperature=0.05, negatives_cross_device=True, **kwargs)


def make_batch(data: dict, teacher: torch.Tensor, kwargs: dict) -> RetrievalBatch:
    return RetrievalBatch(
        GROUP,
        passage_hashes=data["hashes"],
        positive_hashes=data["positives"],
        teacher_scores=teacher if kwargs.get("kd_loss_type") else None,
    )


def counting_allreduce(state, bucket):  # noqa: ANN001 (DDP checks real annotations; these would be strings)
    """DDP's default reduction (mean), counting how many times it runs."""
    state["calls"] += 1
    tensor = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _worker(local_rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        data = rank_data(local_rank)
        teacher = global_teacher()[local_rank * BATCH : (local_rank + 1) * BATCH]
        results = {}
        for name, kwargs in CASES.items():
            loss_fn, batch = make_loss(kwargs), make_batch(data, teacher, kwargs)

            torch.manual_seed(0)
            plain = DistributedDataParallel(TinyM3())
            plain_state = {"calls": 0}
            plain.register_comm_hook(plain_state, counting_allreduce)
            loss_fn(plain(data["q"]), plain(data["p"]), batch, 1).loss.backward()

            torch.manual_seed(0)
            model = DistributedDataParallel(TinyM3())
            state = {"calls": 0}
            model.register_comm_hook(state, counting_allreduce)
            output = GradCache(MINI_BATCH).step(
                encode=model,
                query_features=data["q"],
                passage_features=data["p"],
                compute_loss=lambda q, p, loss_fn=loss_fn, batch=batch: loss_fn(q, p, batch, 1),
                backward=lambda t: t.backward(),
                no_sync=model.no_sync,
            )
            results[name] = {
                "loss": output.loss,
                "grads": [p.grad.clone() for p in model.module.parameters()],
                "calls": state["calls"],
                "plain_calls": plain_state["calls"],
            }
        torch.save(results, Path(out_dir) / f"rank{local_rank}.pt")
        # Leave together: a rank that tears gloo down while its peer still talks aborts the peer (SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cached_ddp_step_equals_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = concatenated()
    for name, kwargs in CASES.items():
        torch.manual_seed(0)
        model = TinyM3()
        output = make_loss(kwargs)(model(data["q"]), model(data["p"]), make_batch(data, global_teacher(), kwargs), 1)
        output.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert sum(float(g.abs().sum()) for g in grads) > 0
        mean_loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, output.loss.detach(), rtol=1e-10, atol=1e-10, msg=name)
        for r in ranks:
            for got, want in zip(r[name]["grads"], grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
            # one reduction per step: as many bucket reductions as one uncached DDP step (and at least one)
            assert r[name]["calls"] == r[name]["plain_calls"] >= 1, name
