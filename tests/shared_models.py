"""Tiny seeded models whose parameters are shared by far-apart layers.

``SharedEmbeddingSeq2Seq``: an ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` pair
with ONE ``nn.Embedding`` read three times, by the encoder input, the decoder input and
the output projection (tied). Cut 4 ways by cost, its embedding lands in stages 0, 1
and 3, so under DualPipeV (rank r holds stages r and 3-r) two ranks hold it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import Case, _randint, _seeded

VOCAB, DIM, SEQ = 64, 32, 8


class SharedEmbeddingSeq2Seq(nn.Module):
    def __init__(self, layers: int = 2, heads: int = 2, ffn: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        enc = nn.TransformerEncoderLayer(DIM, heads, ffn, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(DIM, heads, ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, layers)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        # src, tgt: [batch, SEQ] token ids -> logits [batch, SEQ, VOCAB]
        memory = self.encoder(self.embed(src))
        # tgt_is_causal=True: without it the decoder compares the mask with a causal one on
        # tensor values, which a static graph cannot do
        h = self.decoder(self.embed(tgt), memory, tgt_mask=self.causal, tgt_is_causal=True)
        return self.head(h)


def token_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def seq2seq(seed: int = 0, batch: int = 2, layers: int = 2) -> Case:
    """The shared-embedding encoder-decoder and one micro-batch of ``batch`` sequences."""
    model = _seeded(seed, lambda: SharedEmbeddingSeq2Seq(layers)).train()
    return Case("seq2seq-shared-embedding", model, token_ce,
                (_randint(seed + 1, VOCAB, batch, SEQ), _randint(seed + 2, VOCAB, batch, SEQ)),
                _randint(seed + 3, VOCAB, batch, SEQ))
