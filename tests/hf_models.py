"""Tiny ``transformers`` models as users bring them: built from a config, random init, seeded.

Nothing is downloaded. Every builder takes the config's own ``attn_implementation``
(``"sdpa"``, the default, or ``"eager"``) and returns the unmodified HF model (``model(...)``
returns a ``ModelOutput``). Dropout is off unless asked for: a pipelined step draws its
masks in another order than one process, so only dropout-free models can match it.

``Case`` bundles a model with what ``split``/``compile`` and eager autograd need::

    case = CASES["llama-sdpa"]()
    loss = case.loss_fn(case.model(*case.args, **case.kwargs), case.target)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import transformers as hf

VOCAB, SEQ, MB = 128, 16, 2
# Shared by the decoder-only configs: 4 layers, hidden 32, 4 heads over 2 KV heads (GQA).
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=0, eos_token_id=0, pad_token_id=0)


def lm_loss(out, target):
    """Next-token cross entropy on ``out.logits``: [b, seq, vocab] against [b, seq]."""
    return F.cross_entropy(out.logits.flatten(0, 1), target.flatten())


def cls_loss(out, target):
    """Sequence / image classification: ``out.logits`` [b, labels] against [b]."""
    return F.cross_entropy(out.logits, target)


def hf_loss(out):
    """The model's own loss (``labels=`` passed as a keyword, no separate target)."""
    return out.loss


@dataclass
class Case:
    model: torch.nn.Module
    loss_fn: Callable
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Optional[torch.Tensor] = None


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tokens(batch: int = MB, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, next-token target, attention_mask)``; row 1 of each pair is left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
    target = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[1::2, :3] = 0
    return ids, target, mask


def llama(attn: str = "sdpa", seed: int = 0) -> hf.LlamaForCausalLM:
    """Tied embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``."""
    cfg = hf.LlamaConfig(**_DECODER, tie_word_embeddings=True, attn_implementation=attn)
    return _seeded(seed, lambda: hf.LlamaForCausalLM(cfg))


def gpt2(attn: str = "sdpa", seed: int = 0, dropout: float = 0.0, layers: int = 4) -> hf.GPT2LMHeadModel:
    """Tied embeddings (``lm_head.weight`` is ``transformer.wte.weight``), Conv1D layers."""
    cfg = hf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return _seeded(seed, lambda: hf.GPT2LMHeadModel(cfg))


def _causal(config_cls, model_cls, seed=0, **extra):
    # 2 layers: the breadth cases run on every CI pass; llama and gpt2 keep 4
    cfg = config_cls(**{**_DECODER, "num_hidden_layers": 2, **extra})
    return _seeded(seed, lambda: model_cls(cfg))


def _causal_case(model, kwargs_mask=True) -> Case:
    ids, target, mask = tokens()
    return Case(model, lm_loss, (ids,), {"attention_mask": mask} if kwargs_mask else {}, target)


def mixtral(experts: str = "grouped_mm", seed: int = 0):
    """4 experts, top-2; ``experts`` is transformers' ``experts_implementation``."""
    return _causal(hf.MixtralConfig, hf.MixtralForCausalLM, seed, num_local_experts=4,
                   num_experts_per_tok=2, experts_implementation=experts)


def _t5_case() -> Case:
    cfg = hf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                      num_decoder_layers=1, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids, target, mask = tokens()
    # The model's own loss: labels as a keyword (it shifts them into decoder_input_ids).
    return Case(_seeded(0, lambda: hf.T5ForConditionalGeneration(cfg)), hf_loss, (ids,),
                {"attention_mask": mask, "labels": target})


def _bart_case() -> Case:
    cfg = hf.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=None)
    ids, target, mask = tokens()
    return Case(_seeded(0, lambda: hf.BartForConditionalGeneration(cfg)), lm_loss, (ids,),
                {"attention_mask": mask, "decoder_input_ids": target.roll(1, -1)}, target)


def _bert_case() -> Case:
    cfg = hf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0, num_labels=3)
    ids, _, mask = tokens()
    return Case(_seeded(0, lambda: hf.BertForSequenceClassification(cfg)), cls_loss, (ids,),
                {"attention_mask": mask}, torch.tensor([0, 2]))


def _vit_case() -> Case:
    cfg = hf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                       num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5)
    pixels = torch.randn(MB, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return Case(_seeded(0, lambda: hf.ViTForImageClassification(cfg)), cls_loss, (),
                {"pixel_values": pixels}, torch.tensor([1, 4]))


def _input_ids_as_kwarg(case: Case) -> Case:
    (ids,) = case.args
    return Case(case.model, case.loss_fn, (), {"input_ids": ids, **case.kwargs}, case.target)


# name -> Case factory: the families CI checks on every run, each a few seconds of tracing.
# (Mistral and Qwen3-MoE pass too but add no pattern: Llama's and Mixtral's + Qwen3's.)
# PIPELINED is the 2-rank DualPipeV set (tests/runtime/test_transformers_pipelined.py).
CASES: dict[str, Callable[[], Case]] = {
    "llama-sdpa-mask": lambda: _causal_case(llama("sdpa")),
    "llama-eager-kwarg-ids": lambda: _input_ids_as_kwarg(_causal_case(llama("eager"), kwargs_mask=False)),
    "gpt2-sdpa": lambda: _causal_case(gpt2("sdpa"), kwargs_mask=False),
    "gpt2-eager-mask": lambda: _causal_case(gpt2("eager")),
    "qwen2": lambda: _causal_case(_causal(hf.Qwen2Config, hf.Qwen2ForCausalLM)),
    "qwen3": lambda: _causal_case(_causal(hf.Qwen3Config, hf.Qwen3ForCausalLM, head_dim=8)),
    "gemma": lambda: _causal_case(_causal(hf.GemmaConfig, hf.GemmaForCausalLM, head_dim=8)),
    "mixtral-grouped_mm": lambda: _causal_case(mixtral("grouped_mm")),
    "qwen2moe": lambda: _causal_case(_causal(
        hf.Qwen2MoeConfig, hf.Qwen2MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    "bert-cls": _bert_case,
    "t5-labels": _t5_case,
    "bart": _bart_case,
    "vit-cls": _vit_case,
}
PIPELINED = ["llama-sdpa-mask", "llama-eager-kwarg-ids", "gpt2-sdpa", "gpt2-eager-mask",
             "mixtral-grouped_mm"]
TIED = PIPELINED[:4]  # lm_head.weight is the input embedding
