"""Flex attention with document (block-causal) masks through the core API.

- The split of a whole-batch ``BlockMask`` into micro-batches equals the mask built on each
  micro-batch (block tensors and ``mask_mod`` values), for drawn document layouts (no process).
- Nothing of the example's mask is baked into the graphs: other documents, other results.
- Masks the trace cannot take apart are refused, naming the fix.
- On two ranks, one spawned job: drawn layouts, a decoder with block-causal flex attention;
  the pipelined step equals one process (each micro-batch with its own documents' mask) in
  loss and grads, under DualPipeV (overlapped F&B), ZBV and 1F1B, under each recompute
  policy (None, full, selective, a callable). ``compile_stages=True`` is refused, naming why.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import dualpipe_fx
from dualpipe_fx.runtime.values import micro_batches
from passes.model_call import ModelCall
from tests import flex_models as fm
from tests.runtime.dist_harness import run_ranks

SEQ = 32


@st.composite
def layouts(draw, rows: int, seq: int = SEQ):
    """Per sequence, document lengths summing to ``seq`` (1 to 5 documents, any lengths)."""
    out = []
    for _ in range(rows):
        cuts = sorted(draw(st.sets(st.integers(1, seq - 1), max_size=4)))
        bounds = [0, *cuts, seq]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


@st.composite
def batches(draw):
    """(C, micro-batch size, document lengths of the whole batch)."""
    c = draw(st.integers(1, 4))
    mb = draw(st.integers(1, 2))
    return c, mb, draw(layouts(c * mb))


def _split_masks(mask, c: int):
    """The micro-batch masks the pipeline runs: ``mask`` taken apart into graph inputs (as
    ``compile`` does for an example micro-batch's mask), split by ``micro_batches``, rebuilt."""
    example = fm.document_mask(torch.zeros(mask.shape[0] // c, SEQ, dtype=torch.long))
    call = ModelCall.of((), {"block_mask": example})
    examples = call.values((), {"block_mask": example}, "test", "")
    parts = micro_batches(call.values((), {"block_mask": mask}, "test", ""), examples, call.mask_names, c)
    return [call.rebuild([parts[n][i] for n in call.names])[1]["block_mask"] for i in range(c)]


def _assert_same_mask(got, want) -> None:
    b, _, q, kv = want.shape
    assert got.shape == want.shape
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(create_mask(got.mask_mod, b, None, q, kv, device="cpu"),
                               create_mask(want.mask_mod, b, None, q, kv, device="cpu"),
                               rtol=0, atol=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches())
def test_block_mask_split_equals_mask_of_each_microbatch(batch):
    c, mb, lengths = batch
    docs = fm.doc_ids(lengths)
    whole = fm.document_mask(docs)
    for i, got in enumerate(_split_masks(whole, c)):
        _assert_same_mask(got, fm.document_mask(docs[i * mb:(i + 1) * mb]))


def test_shared_mask_tensors_go_whole_to_every_microbatch():
    """A ``B=None`` mask's block tensors are ``[1, H, ...]`` in the example and the step: shared."""
    causal = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, SEQ, SEQ, device="cpu", BLOCK_SIZE=8)
    call = ModelCall.of((), {"block_mask": causal})
    values = call.values((), {"block_mask": causal}, "test", "")
    parts = micro_batches(values, values, call.mask_names, 3)
    assert all(p[0] is p[1] is p[2] for p in parts.values())


def test_trace_takes_the_mask_as_inputs_nothing_baked():
    """One compiled split, masks of two steps' documents: each run equals eager on its own mask."""
    model = fm.FlexDecoder(depth=2)
    gen = torch.Generator().manual_seed(3)
    tokens, target = (torch.randint(0, fm.VOCAB, (2, SEQ), generator=gen) for _ in range(2))
    step_a, step_b = fm.doc_ids([[5, 27], [32]]), fm.doc_ids([[16, 16], [1, 30, 1]])
    with fm.flex_on_cpu():
        split = dualpipe_fx.split(model, fm.lm_loss, (tokens,), target, num_stages=2,
                                  example_kwargs={"block_mask": fm.document_mask(step_a)})
        losses = []
        for docs in (step_a, step_b):
            loss, grads = split.run((tokens,), target, block_mask=fm.document_mask(docs))
            ref, ref_grads = fm.reference(model, tokens, target, docs, 1)
            assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
            losses.append(loss.item())
    assert losses[0] != losses[1]
    flex_inputs = [n for n in split.partition.captured.gm.graph.nodes if n.op == "placeholder"
                   and n.meta.get("dpfx_name", "").startswith("kwarg:block_mask/")]
    assert any(n.meta["dpfx_name"].endswith("mask_mod.0") for n in flex_inputs)  # the document ids


def test_compile_stages_is_refused_for_flex_models():
    """Dynamo cannot retrace the flex op inside a traced stage graph (torch 2.13/2.14)."""
    from dualpipe_fx.api.compile import check_compile_stages

    docs = fm.doc_ids([[16, 16]])
    tokens = torch.zeros(1, SEQ, dtype=torch.long)
    with fm.flex_on_cpu():
        captured = dualpipe_fx.split(fm.FlexDecoder(depth=1), fm.lm_loss, (tokens,), tokens.clone(), num_stages=1,
                                     example_kwargs={"block_mask": fm.document_mask(docs)}).partition.captured
    check_compile_stages(False, captured.gm)
    with pytest.raises(ValueError, match="compile_stages=False"):
        check_compile_stages(True, captured.gm)


def test_masks_the_trace_cannot_split_are_refused():
    docs = fm.doc_ids([[16, 16]])

    def offset_mask(offset):
        return create_block_mask(lambda b, h, q, kv: q + offset >= kv, 1, None, SEQ, SEQ, device="cpu",
                                 BLOCK_SIZE=8)

    call = ModelCall.of((), {"block_mask": offset_mask(0)})
    with pytest.raises(ValueError, match="mask_mod differs from the traced one"):
        call.values((), {"block_mask": offset_mask(2)}, "step()", "call compile() again")

    class Holder:
        def __init__(self, t):
            self.t = t

    held = Holder(docs)
    mask = fm.document_mask(docs)
    mask.mask_mod = functools.partial(lambda b, h, q, kv, holder: holder.t[b, q] == holder.t[b, kv], holder=held)
    with pytest.raises(TypeError, match="closes over a Holder that holds tensors"):
        ModelCall.of((), {"block_mask": mask})


# -- two ranks -----------------------------------------------------------------------------

C = 4


def _by_module(node):
    """A callable policy: recompute the second block (its flex attention included)."""
    return "recompute" if node.meta.get("dpfx_module", "").startswith("blocks.1") else "save"


def flex_steps(rank, world, cases):
    """Per (schedule, policy, compiled) and drawn batch: the loss and local grads of one step."""
    out = {}
    with fm.flex_on_cpu():
        for schedule, policy, compiled, batch in cases:
            tokens, target, docs = batch
            mb = tokens.shape[0] // C
            model = fm.FlexDecoder(depth=2)
            pipe = dualpipe_fx.compile(model, fm.lm_loss, (tokens[:mb],), target[:mb], num_microbatches=C,
                                       schedule=schedule, compile_stages=compiled,
                                       memory=dualpipe_fx.MemoryPolicy(
                                           recompute=_by_module if policy == "by_module" else policy),
                                       example_kwargs={"block_mask": fm.document_mask(docs[:mb])})
            loss = pipe.step(tokens, target=target, block_mask=fm.document_mask(docs))
            out[(schedule, policy, compiled)] = {
                "loss": None if loss is None else loss.item(),
                "grads": {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}}
    return out


def _batch(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens, target = (torch.randint(0, fm.VOCAB, (len(lengths), SEQ), generator=gen) for _ in range(2))
    return tokens, target, fm.doc_ids(lengths)


# Each recompute policy and each schedule (DualPipeV's F&B pairs run as overlapped graphs),
# in 4 compiles of one spawned job (each traces flex attention through Dynamo, the bulk of
# the time). compile_stages=True is refused with flex (test_compile_stages_is_refused_...).
CASES = (("dualpipev", None, False), ("dualpipev", "full", False), ("zbv", "by_module", False),
         ("1f1b", "selective", False))


@pytest.mark.timeout(900)
@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(drawn=st.lists(layouts(2 * C), min_size=3, max_size=3))
def test_two_ranks_flex_document_masks_equal_one_process(drawn):
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(drawn)]
    cases = [(*case, batches[i % len(batches)]) for i, case in enumerate(CASES)]
    results = run_ranks(flex_steps, 2, (cases,), timeout=850)
    for schedule, policy, compiled, (tokens, target, docs) in cases:
        key = (schedule, policy, compiled)
        ref_loss, ref_grads = fm.reference(fm.FlexDecoder(depth=2), tokens, target, docs, C)
        losses = [r[key]["loss"] for r in results if r[key]["loss"] is not None]
        assert losses and all(x == pytest.approx(ref_loss.item(), rel=1e-6) for x in losses), (key, losses, ref_loss)
        seen = set()
        for r in results:
            for name, g in r[key]["grads"].items():
                torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} {name}: {m}")
                seen.add(name)
        assert seen == set(ref_grads), key
