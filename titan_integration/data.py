"""The project's own tiny dataset and tokenizer, registered the way torchtitan 0.2.2 expects.

Nothing is downloaded: the corpus is ``assets/tiny_corpus.txt`` (a few KB of plain
text written for this project) and the tokenizer is ``assets/tokenizer/tokenizer.json``,
a byte-level BPE trained on that corpus with the ``tokenizers`` library by
:func:`build_tokenizer` (run ``python -m titan_integration.data`` to rebuild it).

torchtitan reads the tokenizer from ``[model] hf_assets_path`` (a folder holding
``tokenizer.json`` and ``tokenizer_config.json``) and looks datasets up by
``[training] dataset`` in ``torchtitan.hf_datasets.text_datasets.DATASETS``;
:func:`register_tiny_dataset` adds :data:`DATASET_NAME` there.
"""
from __future__ import annotations

import json
import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CORPUS_PATH = os.path.join(ASSETS_DIR, "tiny_corpus.txt")
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
DATASET_NAME = "dualpipe_fx_tiny"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _load_text_dataset(path: str):
    """One sample per non-empty line, as an in-memory HF ``Dataset`` (no cache files, no hub)."""
    from datasets import Dataset

    if not os.path.isfile(path):
        raise ValueError(f"training.dataset_path {path!r} is not a file; pass a UTF-8 text file "
                         f"with one sample per line, or leave it unset to use {CORPUS_PATH}")
    return Dataset.from_dict({"text": _read_lines(path)})


def register_tiny_dataset() -> None:
    """Make ``[training] dataset = "dualpipe_fx_tiny"`` known to torchtitan's text dataloader.

    ``[training] dataset_path`` may point at any other one-sample-per-line text file.
    Registering twice is harmless (the entry is the same).
    """
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS[DATASET_NAME] = DatasetConfig(
        path=CORPUS_PATH, loader=_load_text_dataset, sample_processor=lambda sample: sample["text"])


def build_tokenizer(corpus_path: str = CORPUS_PATH, out_dir: str = TOKENIZER_DIR,
                    vocab_size: int = 384) -> str:
    """Train a byte-level BPE tokenizer on ``corpus_path`` and save it where torchtitan looks.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (naming the BOS/EOS tokens)
    into ``out_dir``. Byte-level, so any UTF-8 text encodes without unknown tokens; the
    ids stay below ``vocab_size``, which must not exceed the model's vocabulary (2048
    for llama3's ``debugmodel``).

    Returns:
        ``out_dir``, for ``[model] hf_assets_path``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train([corpus_path], trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "add_bos_token": False,
              "add_eos_token": False, "model_max_length": 4096}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return out_dir


if __name__ == "__main__":
    print(build_tokenizer())
