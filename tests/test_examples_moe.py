"""MoEDecoder: dense == naive per-token experts; 2-rank expert parallelism == dense model."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dualpipe_fx.examples.moe import (MoEConfig, MoEDecoder, ep_average_grads, expert_shard,
                                      moe_batch, moe_loss)
from tests.runtime.dist_harness import run_ranks

CFG = MoEConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, expert_hidden=24)


# ----------------------------------------------------------------------------- single process
def _naive_moe(moe, x):
    """Per token, per chosen expert: the textbook top-k mixture."""
    xs = x.reshape(-1, x.shape[-1])
    top_logits, experts = moe.router(xs).topk(moe.top_k, dim=-1)
    weights = top_logits.softmax(-1)
    rows = []
    for t in range(xs.shape[0]):
        rows.append(sum(weights[t, j] * (F.silu(xs[t] @ moe.w1[e]) @ moe.w2[e])
                        for j, e in enumerate(experts[t].tolist())))
    return torch.stack(rows).view(x.shape)


def test_dense_moe_equals_naive_top_k_mixture():
    moe = MoEDecoder(CFG, seed=1).layers[0].moe
    x = torch.randn(3, 5, CFG.dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moe(x), _naive_moe(moe, x), rtol=1e-5, atol=1e-6)


def test_same_seed_same_model_and_bad_config():
    a, b = MoEDecoder(CFG, seed=3), MoEDecoder(CFG, seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="top_k=5"):
        MoEConfig(n_experts=4, top_k=5)


# ----------------------------------------------------------------------------- expert parallel
def _ep_rank(rank, world):
    group = torch.distributed.new_group(list(range(world)))
    tokens, target = moe_batch(CFG, 2 * world, 6, seed=5)
    model = MoEDecoder(CFG, seed=2, group=group)
    shard = slice(2 * rank, 2 * rank + 2)  # each EP rank routes its own tokens
    loss = moe_loss(model(tokens[shard]), target[shard])
    loss.backward()
    ep_average_grads(model.named_parameters(), group)
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss.detach(), group=group)
    return torch.stack(losses).mean(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_expert_parallel_two_ranks_equals_dense():
    results = run_ranks(_ep_rank, 2)
    dense = MoEDecoder(CFG, seed=2)
    tokens, target = moe_batch(CFG, 4, 6, seed=5)
    ref_loss = moe_loss(dense(tokens), target)
    ref_loss.backward()
    for rank, (loss, grads) in enumerate(results):
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
        for name, p in dense.named_parameters():
            torch.testing.assert_close(grads[name], expert_shard(name, p.grad, rank, 2),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_expert_group_of_one_is_bitwise_dense():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = MoEDecoder(CFG, seed=4, group=dist.new_group([0]))
        tokens, target = moe_batch(CFG, 2, 6, seed=7)
        loss = moe_loss(model(tokens), target)
        loss.backward()
    finally:
        dist.destroy_process_group()
    dense = MoEDecoder(CFG, seed=4)
    ref = moe_loss(dense(tokens), target)
    ref.backward()
    assert torch.equal(loss, ref)
    for (name, p), q in zip(model.named_parameters(), dense.parameters()):
        assert torch.equal(p.grad, q.grad), name
