"""Tiny seeded models called with keyword arguments and returning structured outputs.

``Seq2Seq``: ``model(src, tgt=..., src_mask=..., use_flag=True, scale=2.0, mode="dict")``,
an encoder-decoder shape (the decoder reads ``tgt`` and a masked mean of the encoder
states); ``mode`` picks the output: a dict holding a plain dataclass, or a tensor.
``TinyCausalLM``: ``model(input_ids, attention_mask=..., return_dict=True)`` returning a
``transformers`` ``CausalLMOutput`` (``loss=None``, ``hidden_states`` set), as HF models do.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ = 16, 8, 5


@dataclass
class Context:
    """A dataclass torch's pytree does not know: dualpipe_fx rebuilds it by its init fields."""

    mean: torch.Tensor
    count: int = 0
    tag: str = field(default="ctx")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class Seq2Seq(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()

        def build():
            return (nn.Embedding(VOCAB, DIM), nn.Embedding(VOCAB, DIM),
                    nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3)),
                    nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3)), nn.Linear(DIM, VOCAB))

        self.src_emb, self.tgt_emb, self.enc, self.dec, self.head = _seeded(seed, build)

    def forward(self, src, tgt=None, src_mask=None, use_flag=True, scale=1.0, mode="dict"):
        h = self.src_emb(src)                                   # [b, s, d]
        for layer in self.enc:
            h = h + torch.tanh(layer(h))
        mask = src_mask.to(h.dtype)[..., None]                  # [b, s, 1]
        ctx = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)    # [b, d]
        t = self.tgt_emb(tgt) + ctx[:, None]
        if use_flag:
            t = t * scale
        for layer in self.dec:
            t = t + F.gelu(layer(t))
        logits = self.head(t)                                   # [b, s, vocab]
        if mode == "tensor":
            return logits
        return {"logits": logits, "context": Context(ctx, count=src.shape[1]), "note": None}


def seq2seq_loss(out, target):
    logits = out if isinstance(out, torch.Tensor) else out["logits"]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def seq2seq_batch(batch: int, seed: int = 1) -> dict:
    """``src``, ``tgt``, ``src_mask`` (int64, some zeros) and the ``target`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, VOCAB, (batch, SEQ), generator=gen) for _ in range(3)]
    mask = (torch.rand(batch, SEQ, generator=gen) > 0.3).long()
    return {"src": tokens[0], "tgt": tokens[1], "src_mask": mask, "target": tokens[2]}


class TinyCausalLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.emb, self.layers, self.head = _seeded(seed, lambda: (
            nn.Embedding(VOCAB, DIM), nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(4)),
            nn.Linear(DIM, VOCAB)))

    def forward(self, input_ids, attention_mask=None, return_dict=True):
        from transformers.modeling_outputs import CausalLMOutput

        h = self.emb(input_ids) * attention_mask[..., None].to(torch.float32)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        logits = self.head(h)
        if not return_dict:
            return (logits,)
        return CausalLMOutput(loss=None, logits=logits, hidden_states=(h,))


def causal_lm_loss(out, target):
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())
