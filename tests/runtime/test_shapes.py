"""Batches whose shapes change (issue 24): a new shape is a new program, agreed and cached.

Rebuilds: 2-rank DualPipeV steps at sequence lengths 32, 48, 32, 64 (grads accumulated over
steps of different lengths, then an optimizer step) equal one process in loss, grads and
weights, the repeated 32 running its cached program; a forward-only step at an evicted
length (max_programs=2) builds it again and gives the model's outputs; a rank that passes
another length makes every rank raise the same error naming both shapes, and the next step
is exact; a smaller last batch runs with fewer micro-batches under 1F1B and is refused
under DualPipeV (C >= 2N); an HF Llama with dynamic padding and an attention mask trains
like one process over two steps of different lengths.
"""
from __future__ import annotations

import pytest
import torch

from dualpipe_fx import examples as ex
from tests import hf_models as hm
from tests.runtime.dist_harness import run_ranks

C = 4
LENGTHS = (32, 48, 32, 64)
CFG = dict(vocab_size=32, dim=16, n_layers=4, n_heads=2, ffn_hidden=24, max_seq_len=64)


def _llama():
    cfg = ex.LlamaConfig(**CFG)
    return cfg, ex.LlamaDecoder(cfg, seed=0)


def _batch(seq: int, batch: int = C):
    return ex.llama_batch(ex.LlamaConfig(**CFG), batch=batch, seq=seq, seed=seq)


def _grads(pipe) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test compares the type and text
        return f"{type(err).__name__}: {err}"
    return "NO ERROR"


def _item(loss):
    return None if loss is None else loss.item()


def varying_lengths(rank, world):
    import dualpipe_fx

    _, model = _llama()
    x, y = _batch(LENGTHS[0])
    pipe = dualpipe_fx.compile(model, ex.llama_loss, (x[:1],), y[:1], schedule="dualpipev", num_microbatches=C,
                               max_programs=2)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.5)
    out = {"losses": [], "builds": [], "grads": []}
    for i, seq in enumerate(LENGTHS):
        x, y = _batch(seq)
        out["losses"].append(_item(pipe.step(x, target=y)))
        out["builds"].append(pipe._shapes.builds)
        if i % 2:  # grads of two steps of different lengths, then an optimizer step
            out["grads"].append(_grads(pipe))
            opt.step()
            opt.zero_grad()
    x48, y48 = _batch(48)
    other = x48 if rank == 1 else _batch(32)[0]
    out["disagree"] = _error(lambda: pipe.step(other, target=y48 if rank == 1 else _batch(32)[1]))
    out["indivisible"] = _error(lambda: pipe.step(x48[:3], target=y48[:3]))  # C' = 3 < 2N
    with torch.no_grad():  # 48 was evicted (max_programs=2: 32 and 64 kept): built again
        out["forward"] = pipe.step(x48, target=y48)
    out["builds"].append(pipe._shapes.builds)
    out["params"] = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    x64, y64 = _batch(64)  # cached: profiled as it is; 40 was never built
    out["profiled"] = [r.samples_per_s > 0 if r is not None else None for r in [pipe.profile(x64, target=y64, steps=1)]]
    x40, y40 = _batch(40)
    out["profile_unbuilt"] = _error(lambda: pipe.profile(x40, target=y40))
    out["last_batch"] = _smaller_last_batch()
    out["mixed_precision"] = _mixed_precision_batches()
    return out


MP_BATCHES = (8, 12)  # micro-batches of 2, then of 3


def _mp_case():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = ex.LinearGeluStack(depth=4, width=8, seed=0)
    batches = [ex.linear_gelu_batch(8, batch=b, seed=b) for b in MP_BATCHES]
    return model, batches, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _mixed_precision_batches():
    """bf16 compute (no dp_group): each shape's program casts the same fp32 parameters."""
    import dualpipe_fx

    model, batches, policy = _mp_case()
    x, y = batches[0]
    pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:2],), y[:2], schedule="dualpipev", num_microbatches=C,
                               mixed_precision=policy)
    losses = [_item(pipe.step(x, target=y)) for x, y in batches]
    return {"losses": losses, "grads": _grads(pipe), "dtypes": {str(p.grad.dtype) for p in pipe.parameters()}}


def _smaller_last_batch():
    """1F1B on 2 ranks takes C >= 2: a batch of 6 at C=4 (micro-batch 2) runs as 3 micro-batches."""
    import dualpipe_fx

    model = ex.LinearGeluStack(depth=4, width=8, seed=0)
    x, y = ex.linear_gelu_batch(8, batch=6, seed=1)
    pipe = dualpipe_fx.compile(model, ex.mse_loss, (x[:2],), y[:2], schedule="1f1b", num_microbatches=C)
    loss = pipe.step(x, target=y)
    return {"loss": _item(loss), "grads": _grads(pipe), "count": pipe.num_microbatches}


def _reference_lengths():
    _, model = _llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], []
    for i, seq in enumerate(LENGTHS):
        x, y = _batch(seq)
        loss = sum(ex.llama_loss(model(x[j:j + 1]), y[j:j + 1]) for j in range(C)) / C
        loss.backward()
        losses.append(loss.item())
        if i % 2:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        logits = model(_batch(48)[0])
    return losses, grads, logits, dict(model.named_parameters())


@pytest.fixture(scope="module")
def results():
    return run_ranks(varying_lengths, 2, timeout=400)


@pytest.mark.timeout(500)
def test_lengths_32_48_32_64_train_like_one_process(results):
    losses, grads, logits, params = _reference_lengths()
    assert results[1]["losses"] == [None] * len(LENGTHS)  # the loss lives on rank 0
    for got, want in zip(results[0]["losses"], losses):
        assert abs(got - want) <= 1e-6 * abs(want), (results[0]["losses"], losses)
    for r in results:
        for got, want in zip(r["grads"], grads):  # accumulated over 32+48, then over 32+64
            for name, grad in got.items():
                torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-6, msg=name)
        for name, p in r["params"].items():
            torch.testing.assert_close(p, params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(results[0]["forward"], logits, rtol=1e-5, atol=1e-6)
    assert results[1]["forward"] is None


def test_a_repeated_shape_is_not_built_again_and_the_lru_evicts(results):
    for r in results:
        # 48 and 64 built, the second 32 cached; 48 evicted by 64 (max_programs=2) and built again
        assert r["builds"] == [0, 1, 1, 2, 3], r["builds"]
        assert "run one step() at them first" in r["profile_unbuilt"], r["profile_unbuilt"]
    assert results[0]["profiled"] == [True] and results[1]["profiled"] == [None]  # a cached shape profiles


def test_a_rank_with_another_length_fails_every_rank_naming_both_shapes(results):
    for r in results:
        message = r["disagree"]
        assert message.startswith("ValueError: step(): the ranks disagree on step() input shapes"), message
        assert "rank 0 has" in message and "[1, 32]" in message and "rank 1 has" in message and "[1, 48]" in message


def test_a_smaller_last_batch_runs_where_the_schedule_allows_it(results):
    for r in results:
        message = r["indivisible"]  # DualPipeV on 2 ranks: C' = 3 < 2N = 4
        assert message.startswith("ValueError") and "batch size 3" in message and "C >= 2N" in message, message
    model = ex.LinearGeluStack(depth=4, width=8, seed=0)
    x, y = ex.linear_gelu_batch(8, batch=6, seed=1)
    loss = sum(ex.mse_loss(model(x[j:j + 2]), y[j:j + 2]) for j in range(0, 6, 2)) / 3
    loss.backward()
    got = results[-1]["last_batch"]  # 1F1B: the loss on the last rank
    assert got["count"] == 3 and abs(got["loss"] - loss.item()) <= 1e-6 * abs(loss.item())
    for r in results:
        for name, grad in r["last_batch"]["grads"].items():
            torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)


def test_mixed_precision_programs_accumulate_fp32_grads_like_one_process(results):
    """Per shape, one process runs the same bf16 split (dualpipe_fx.split(..., mixed_precision=)
    .run, micro-batch by micro-batch): the pipelined steps at two batch sizes equal it."""
    import dualpipe_fx

    model, batches, policy = _mp_case()
    losses, grads = [], {}
    for x, y in batches:
        mb = x.shape[0] // C
        split = dualpipe_fx.split(model, ex.mse_loss, (x[:mb],), y[:mb], num_stages=4, mixed_precision=policy)
        step = [split.run((x[i:i + mb],), y[i:i + mb]) for i in range(0, x.shape[0], mb)]
        losses.append(sum(loss.item() for loss, _ in step) / C)
        for _, g in step:
            for name, grad in g.items():
                grads[name] = grads.get(name, 0) + grad / C
    got = results[0]["mixed_precision"]
    assert got["losses"] == pytest.approx(losses, rel=1e-3), (got["losses"], losses)
    for r in results:
        assert r["mixed_precision"]["dtypes"] == {"torch.float32"}
        for name, grad in r["mixed_precision"]["grads"].items():
            torch.testing.assert_close(grad, grads[name], rtol=1e-2, atol=1e-3, msg=name)


def _padded(seq: int, seed: int):
    """HF tokens of length ``seq`` padded on the left by 2 x row index (dynamic padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, hm.VOCAB, (C, seq), generator=g)
    target = torch.randint(3, hm.VOCAB, (C, seq), generator=g)
    mask = torch.ones(C, seq, dtype=torch.long)
    for row in range(C):
        mask[row, : 2 * row] = 0
    return ids, target, mask


def hf_padded_steps(rank, world):
    import dualpipe_fx

    model = hm.llama()
    ids, target, mask = _padded(16, 0)
    pipe = dualpipe_fx.compile(model, hm.lm_loss, (ids[:1],), target[:1], example_kwargs={"attention_mask": mask[:1]},
                               schedule="dualpipev", num_microbatches=C)
    losses = []
    for seq, seed in ((16, 0), (10, 1)):
        ids, target, mask = _padded(seq, seed)
        losses.append(_item(pipe.step(ids, target=target, attention_mask=mask)))
    return {"losses": losses, "grads": _grads(pipe)}


@pytest.mark.long  # its own 2-rank job with a transformers model: the long tier (docs/contributing.md)
@pytest.mark.timeout(400)
def test_hf_llama_with_dynamic_padding_trains_like_one_process():
    results = run_ranks(hf_padded_steps, 2, timeout=360)
    model = hm.llama()
    losses = []
    for seq, seed in ((16, 0), (10, 1)):
        ids, target, mask = _padded(seq, seed)
        loss = sum(hm.lm_loss(model(ids[j:j + 1], attention_mask=mask[j:j + 1]), target[j:j + 1])
                   for j in range(C)) / C
        loss.backward()
        losses.append(loss.item())
    for got, want in zip(results[0]["losses"], losses):
        assert abs(got - want) <= 1e-5 * abs(want), (results[0]["losses"], losses)
    params = dict(model.named_parameters(remove_duplicate=False))
    for r in results:
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("schedule, batch, want", [
    ("dualpipev", 8, 4), ("dualpipev", 12, 4), ("dualpipev", 6, None), ("dualpipe", 6, None),
    ("1f1b", 6, 3), ("1f1b", 5, None), ("gpipe", 5, 1), ("zbv", 6, 3), ("zb1p", 7, 1),
])
def test_the_smaller_last_batch_rule_per_schedule(schedule, batch, want):
    """num_microbatches=4 on 2 ranks: 4 when it divides the batch, else the largest smaller count
    that divides it and that the schedule accepts (docs/compile.md's table)."""
    from dualpipe_fx.runtime.programs import microbatch_count

    if want is None:
        with pytest.raises(ValueError, match=f"batch size {batch} does not divide into num_microbatches=4"):
            microbatch_count(batch, 4, schedule, 2)
    else:
        assert microbatch_count(batch, 4, schedule, 2) == want


def test_the_lru_keeps_max_programs_and_a_signature_digest_is_stable():
    from dualpipe_fx.runtime.programs import Shapes, Signature

    sig = [Signature(4, (("inputs[0]", (1, n), "int64"),), ((1, n), "int64")) for n in (32, 48, 64)]
    shapes = Shapes(build=None, schedule="dualpipev", world=2, num_microbatches=4, max_programs=2)
    assert shapes.add(sig[0], {}) == [] and shapes.add(sig[1], {}) == []
    assert shapes.find(sig[0]) == sig[0]
    shapes.used(sig[0])  # now the most recently used
    assert shapes.add(sig[2], {}) == [sig[1]] and list(shapes.programs) == [sig[0], sig[2]]
    forward_only = Signature(4, sig[0].inputs, None)  # no target: any program of these inputs serves
    assert shapes.find(forward_only) == sig[0] and shapes.find(Signature(2, sig[0].inputs, None)) is None
    assert sig[0].key == Signature(4, (("inputs[0]", (1, 32), "int64"),), ((1, 32), "int64")).key
    assert 0 <= sig[0].key < 2 ** 62 and len({s.key for s in sig}) == 3
