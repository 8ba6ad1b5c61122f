"""Train TinyMind's byte-level BPE tokenizer and write model/tokenizer.json.

    python trainer/train_tokenizer.py                      # the shipped demo corpus -> model/tokenizer.json
    python trainer/train_tokenizer.py --data_path dataset/pretrain_hq.jsonl,dataset/sft_mini_512.jsonl \
        --vocab_size 6400 --out model/tokenizer.json       # MiniMind's real data

Tokenizer training runs on the CPU in a single process (the Rust side uses all cores); there is no GPU or
torchrun variant. The shipped model/tokenizer.json was made by the first command.

Implements:
- ``iter_corpus``: streams every string of one or several jsonl files, in either format
  (``{"text"}`` pretraining lines or ``{"conversations"}`` chat lines: roles and contents), line by line.
- ``train_bpe``: byte-level BPE (``tokenizers``): text -> UTF-8 bytes -> 256 base tokens, then the most
  frequent adjacent pairs are merged until ``vocab_size``. Special tokens come first so their ids are fixed:
  ``<|endoftext|>`` = 0 (pad), ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, then ``<|reserved_0..4|>``.
- ``main``: trains, writes the file atomically (``*.tmp`` then ``os.replace``), and prints how many
  characters one token covers on Chinese, English and mixed samples (higher = shorter sequences).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import time

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dataset.lm_dataset import PROGRESS_EVERY_S, JsonlReader, display_path, parse_any_text
from model.common import TinyMindError, repo_path, run_main
from model.tokenizer import SPECIAL_TOKENS, TinyMindTokenizer

# Only the base model's training text: a merge learned from LoRA data alone would make tokens whose
# (tied, frozen) embeddings pretraining never trained, and a LoRA could hardly learn to emit them.
# The LoRA files' words are then spelled with tokens the base model already knows.
DEFAULT_DATA = "dataset/pretrain_demo.jsonl,dataset/sft_demo.jsonl"

# Held-out samples for the chars/token figure (not taken from the training data).
SAMPLES = {
    "zh": "人工智能是计算机科学的一个分支，它研究如何让机器理解语言、学习知识并解决问题。"
          "今天天气很好，我们一起去公园散步，然后回家吃饭。多喝水、早睡早起对身体有好处。",
    "en": "The quick brown fox jumps over the lazy dog. A language model learns to predict the next token "
          "from the tokens before it, and a smaller vocabulary means longer sequences for the same text.",
    "mixed": "TinyMind 是一个从零开始训练的小型语言模型，使用 byte-level BPE 分词器，词表大小为 6400。"
             "It runs on a CPU in minutes，支持 LoRA 微调和 Python 代码 print('hello')。",
}


def iter_corpus(paths, skip_bad_lines=False, counters=None):
    """Yield every string (pretraining text, chat role and content) of the jsonl files, streaming.

    Prints a progress line every few seconds on big files; ``counters`` collects the readers
    (their bad-line counts) when given.
    """
    for path in paths:
        reader = JsonlReader(path, parse_any_text, skip_bad_lines)
        t0 = last = time.time()
        for _, texts in reader:
            yield from texts
            if time.time() - last > PROGRESS_EVERY_S:
                last = time.time()
                print(f"[corpus] {reader.name}: {reader.lineno:,} lines, "
                      f"{reader.bytes_read / 2**20 / (last - t0):.1f} MB/s", flush=True)
        if counters is not None:
            counters.append(reader)


def train_bpe(texts, vocab_size=6400, min_frequency=2, show_progress=False) -> Tokenizer:
    """Train a byte-level BPE tokenizer on an iterable of strings; returns a ``tokenizers.Tokenizer``."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise TinyMindError(f"--vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                            f"plus {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: " hello" and "hello" stay different, so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..7, in this order, before anything learned
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def chars_per_token(tokenizer: TinyMindTokenizer, text: str) -> float:
    return len(text) / max(1, len(tokenizer.encode(text)))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train TinyMind's byte-level BPE tokenizer.")
    parser.add_argument("--data_path", default=DEFAULT_DATA,
                        help="jsonl file(s), comma-separated; {'text'} or {'conversations'} lines "
                             "(every text, role and content is used)")
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size including special tokens")
    parser.add_argument("--min_frequency", type=int, default=2, help="a pair must occur this often to be merged")
    parser.add_argument("--out", default="model/tokenizer.json", help="where to write tokenizer.json (atomically)")
    parser.add_argument("--skip_bad_lines", type=int, default=0,
                        help="1: skip and count malformed lines instead of stopping at the first")
    args = parser.parse_args(argv)

    paths = [repo_path(p.strip()) for p in args.data_path.split(",") if p.strip()]
    if not paths:
        raise TinyMindError("--data_path is empty")
    for p in paths:  # fail before training, not in the middle of the stream
        if not p.is_file():
            raise TinyMindError(f"--data_path: data file not found: {display_path(p)}")
    print(f"training byte-level BPE, vocab_size={args.vocab_size}, on: "
          + ", ".join(f"{display_path(p)} ({p.stat().st_size / 2**20:.1f} MB)" for p in paths), flush=True)
    t0 = time.time()
    readers = []
    tok = TinyMindTokenizer(train_bpe(iter_corpus(paths, bool(args.skip_bad_lines), readers),
                                      args.vocab_size, args.min_frequency))
    for r in readers:
        if r.summary():
            print(r.summary())
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus only supports {tok.vocab_size} tokens (fewer than --vocab_size {args.vocab_size})")
    out = tok.save(args.out)
    print(f"wrote {display_path(out)}: {tok.vocab_size} tokens in {time.time() - t0:.1f}s")

    print("chars/token (higher = fewer tokens for the same text):")
    for name, text in SAMPLES.items():
        print(f"  {name:<6} {chars_per_token(tok, text):.2f}  ({len(text)} chars)")
    for p in paths:  # the training corpus itself, first 2000 records of each file
        texts = []
        for _, t in JsonlReader(p, parse_any_text, skip_bad_lines=True):
            texts.extend(t)
            if len(texts) >= 2000:
                break
        text = "\n".join(texts)
        print(f"  {display_path(p)}: {chars_per_token(tok, text):.2f}")
    return tok


if __name__ == "__main__":
    run_main(main)
