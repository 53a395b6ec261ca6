"""Built-in example models: determinism, shapes, causality, and the reference layers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualpipe_fx.examples import (
    LinearGeluStack,
    LlamaConfig,
    LlamaDecoder,
    apply_rope,
    example_batch,
    linear_gelu_batch,
    llama_batch,
    llama_loss,
    mse_loss,
)

SMALL = LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=12)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_llama_seeded_and_default_sizes():
    assert _same_state(LlamaDecoder(SMALL, seed=3), LlamaDecoder(SMALL, seed=3))
    assert not _same_state(LlamaDecoder(SMALL, seed=3), LlamaDecoder(SMALL, seed=4))
    model = LlamaDecoder()
    assert model.cfg.n_layers == 8 and len(model.layers) == 8
    names = dict(model.named_parameters())
    assert "layers.3.attention.wq.weight" in names and "output.weight" in names
    assert names["output.weight"] is not names["tok_embeddings.weight"]  # untied head


def test_seed_does_not_disturb_the_global_rng():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    LlamaDecoder(SMALL, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_llama_forward_shape_loss_and_backward():
    model = LlamaDecoder(SMALL)
    tokens, target = llama_batch(SMALL, batch=3, seq=10, seed=1)
    assert tokens.shape == target.shape == (3, 10) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], target[:, :-1])  # next-token targets
    logits = model(tokens)
    assert logits.shape == (3, 10, SMALL.vocab_size)
    loss = llama_loss(logits, target)
    # small random init: the loss sits near the uniform-guess value log(vocab)
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_llama_is_causal():
    model = LlamaDecoder(SMALL)
    tokens, _ = llama_batch(SMALL, batch=1, seq=8)
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % SMALL.vocab_size
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_rope_rotates_pairs_and_keeps_norms():
    cos = torch.cos(torch.tensor([[0.3, 1.1]]))
    sin = torch.sin(torch.tensor([[0.3, 1.1]]))
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])  # [b, h, s=1, d=4]
    out = apply_rope(x, cos, sin)
    pair0 = torch.tensor([1.0 * cos[0, 0] - 2.0 * sin[0, 0], 1.0 * sin[0, 0] + 2.0 * cos[0, 0]])
    assert torch.allclose(out[0, 0, 0, :2], pair0)
    assert torch.allclose(out.norm(), x.norm())


def test_llama_config_and_batch_errors():
    with pytest.raises(ValueError, match="dim=10 must split into n_heads=4"):
        LlamaConfig(dim=10, n_heads=4)
    with pytest.raises(ValueError, match="seq=20 exceeds max_seq_len=12"):
        llama_batch(SMALL, seq=20)


def test_linear_gelu_stack_matches_its_definition():
    model = LinearGeluStack(depth=3, width=8, seed=2)
    assert _same_state(model, LinearGeluStack(depth=3, width=8, seed=2))
    x, target = linear_gelu_batch(width=8, batch=4, seed=5)
    ref = x
    for layer in model.layers:
        ref = F.gelu(ref @ layer.linear.weight.T + layer.linear.bias)
    assert torch.allclose(model(x), ref)
    assert torch.allclose(mse_loss(model(x), target), ((ref - target) ** 2).mean())
    assert LinearGeluStack().width == 1024 and len(LinearGeluStack(width=4).layers) == 8
    with pytest.raises(ValueError, match="depth=0"):
        LinearGeluStack(depth=0)


def test_example_batch_dispatch():
    x, y = example_batch(LinearGeluStack(depth=1, width=4), batch=2, seed=1)
    assert x.shape == y.shape == (2, 4)
    assert torch.equal(x, linear_gelu_batch(width=4, batch=2, seed=1)[0])
    tokens, target = example_batch(LlamaDecoder(SMALL), batch=2, seq=6)
    assert tokens.shape == (2, 6) and int(tokens.max()) < SMALL.vocab_size
    with pytest.raises(TypeError, match="expected LlamaDecoder or LinearGeluStack"):
        example_batch(nn.Linear(2, 2))


def test_llama_built_on_meta_initialises_itself_module_by_module():
    """compile()'s default init (each module's reset_parameters) covers every tensor of the
    built-in llama: RoPE tables equal a CPU-built model's, RMSNorm scales are one."""
    from dualpipe_fx.runtime.materialize import materialize
    from dualpipe_fx.examples import LlamaConfig, LlamaDecoder

    cfg = LlamaConfig(n_layers=2)
    with torch.device("meta"):
        model = LlamaDecoder(cfg)
    names = set(model.state_dict(keep_vars=True)) | {"rope_cos", "rope_sin"}
    assert materialize(model, names, torch.device("cpu"), None) == {}  # nothing left pending
    ref = LlamaDecoder(cfg)
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if type(m).__name__ == "RMSNorm")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
