"""A small decoder with block-causal (document-masked) flex attention, and its masks.

``FlexDecoder(tokens, *, block_mask)``: embedding -> ``depth`` x (flex attention + MLP, each
residual) -> head. ``document_mask(doc_ids)`` builds the mask the way torchtitan does:
``and_masks(causal, document)`` where the document ``mask_mod`` closes over the per-sample
document ids ``[B, S]`` (a nested closure, as ``and_masks`` holds the mask_mods in a tuple).

``flex_on_cpu`` is the tests' CPU stand-in: torch refuses flex attention's backward on CPU
in its Python wrapper; ``passes._compat.flex_backward_on_cpu`` lifts that check only, and only
where CUDA is absent (DESIGN.md, "CPU stand-ins stay at the edge").
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

from passes._compat import flex_backward_on_cpu

VOCAB, DIM, HEADS, BLOCK = 32, 16, 2, 8


def flex_on_cpu():
    """The CPU stand-in (a context manager); a no-op where CUDA is present."""
    return contextlib.nullcontext() if torch.cuda.is_available() else flex_backward_on_cpu()


def doc_ids(lengths: list[list[int]]) -> torch.Tensor:
    """Document ids ``[B, S]`` from per-sequence document lengths (each row sums to S)."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])


def _causal(b, h, q, kv):
    return q >= kv


def document_mask(docs: torch.Tensor, block: int = BLOCK):
    """The block-causal ``BlockMask`` of document ids ``docs`` ``[B, S]``."""
    def same_document(b, h, q, kv):
        return docs[b, q] == docs[b, kv]

    seq = docs.shape[1]
    return create_block_mask(and_masks(_causal, same_document), docs.shape[0], None, seq, seq,
                             device=str(docs.device), BLOCK_SIZE=block)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x, block_mask):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # [b, h, s, hd] each
        y = flex_attention(q, k, v, block_mask=block_mask)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        return x + F.gelu(self.mlp(x))


class FlexDecoder(nn.Module):
    def __init__(self, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = nn.Embedding(VOCAB, DIM)
            self.blocks = nn.ModuleList(_Block() for _ in range(depth))
            self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, *, block_mask):
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h, block_mask)
        return self.head(h)


def lm_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def reference(model: nn.Module, tokens, target, docs, num_microbatches: int):
    """Loss and grads of one process: the mean of the micro-batch losses, each micro-batch
    with the mask built on its own documents (what the pipelined step must equal)."""
    model.zero_grad(set_to_none=True)
    losses = []
    with flex_on_cpu():
        for t, y, d in zip(tokens.tensor_split(num_microbatches), target.tensor_split(num_microbatches),
                           docs.tensor_split(num_microbatches)):
            loss = lm_loss(model(t, block_mask=document_mask(d)), y) / num_microbatches
            loss.backward()
            losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return sum(losses), grads
