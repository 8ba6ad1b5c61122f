"""Datasets that feed TinyMind's training loops.

Implements:
- ``JsonlReader``: streams a ``.jsonl`` file line by line and turns every bad line (invalid UTF-8,
  malformed JSON, missing key, unknown role, empty content) into ``TinyMindError("file line N: ...")``,
  or skips and counts it with ``skip_bad_lines=True``. ``parse_text`` / ``parse_conversation`` check
  one record of each format.
- ``PretrainDataset``: ``{"text": ...}`` lines. Every document becomes ``[1] + ids + [2]``
  (``<|im_start|>`` text ``<|im_end|>``), all documents are concatenated and cut into full
  ``max_seq_len`` windows -- no padding at all. The token stream is tokenized once into a flat uint16
  cache file (read back with ``np.memmap``), reused until the data file or the tokenizer changes.
- ``SFTDataset``: ``{"conversations": [{"role", "content"}, ...]}`` lines, rendered with the ChatML
  template (an imported model's tokenizer: its own template, ``own_template_segments``); only the
  assistant's tokens (its content and the ``<|im_end|>`` or other end-of-turn token that ends it) carry
  labels, everything else is -100 so the loss ignores it.
- ``collate_batch``: pads a list of (input_ids, labels) to the longest item and builds the attention mask.

Run it to inspect a data file (and to build the pretrain cache before a multi-GPU run)::

    python dataset/lm_dataset.py --data_path dataset/pretrain_demo.jsonl --mode pretrain
    python dataset/lm_dataset.py --data_path dataset/sft_demo.jsonl --mode sft --max_seq_len 512
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import glob
import hashlib
import json
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from model.common import ROOT, TinyMindError, atomic_write, atomic_write_text, repo_path, run_main
from model.tokenizer import CHAT_ROLES, TinyMindTokenizer, load_tokenizer

IGNORE_INDEX = -100  # label value the loss skips (F.cross_entropy's default ignore_index)
CACHE_VERSION = 1  # bump when the cache layout changes so old caches are rebuilt
PROGRESS_EVERY_S = 5.0  # seconds between progress lines while tokenizing a big file
BATCH_LINES = 1024  # lines tokenized per encode_batch call: big enough for Rust parallelism, small in memory


# ----------------------------------------------------------------------------- reading jsonl

class BadLine(ValueError):
    """Raised by a record parser; ``JsonlReader`` adds the file name and line number."""


def display_path(path) -> str:
    """``dataset/x.jsonl`` for files inside the repo, the absolute path otherwise (used in messages)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


class JsonlReader:
    """Iterate ``(lineno, parse(obj))`` over a jsonl file, one line in memory at a time.

    ``parse`` raises ``BadLine`` for a record it cannot use. Every bad line -- invalid UTF-8, malformed
    JSON, a record ``parse`` refuses -- raises ``TinyMindError("file line N: ...")`` (N counts from 1),
    or with ``skip_bad_lines=True`` is skipped and counted in ``num_bad`` (``first_bad`` keeps the first
    message). Blank lines are ignored. ``bytes_read`` drives the MB/s figure of progress lines.
    """

    def __init__(self, path, parse, skip_bad_lines: bool = False):
        self.path = repo_path(path)
        if not self.path.is_file():
            raise TinyMindError(f"data file not found: {display_path(self.path)}")
        self.name = display_path(self.path)
        self.parse, self.skip_bad_lines = parse, skip_bad_lines
        self.num_bad, self.first_bad, self.bytes_read, self.lineno = 0, None, 0, 0

    def _bad(self, msg: str):
        full = f"{self.name} line {self.lineno}: {msg}"
        if not self.skip_bad_lines:
            raise TinyMindError(full + " (skip_bad_lines=True / --skip_bad_lines 1 skips such lines)")
        self.num_bad += 1
        self.first_bad = self.first_bad or full

    def __iter__(self):
        with open(self.path, "rb") as f:  # bytes, so invalid UTF-8 is reported with its line number
            for self.lineno, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                    if not isinstance(obj, dict):
                        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
                    value = self.parse(obj)
                except UnicodeDecodeError as e:
                    self._bad(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start})")
                except json.JSONDecodeError as e:
                    self._bad(f"malformed JSON ({e.msg} at column {e.colno})")
                except BadLine as e:
                    self._bad(str(e))
                else:
                    yield self.lineno, value

    def summary(self) -> str | None:
        """One line about skipped lines, or None when there were none."""
        if not self.num_bad:
            return None
        return f"skipped {self.num_bad} bad line(s) in {self.name} (first: {self.first_bad})"


def parse_text(obj: dict) -> str:
    """A pretraining record ``{"text": "..."}``."""
    if "text" not in obj:
        raise BadLine(f'missing key "text" (keys: {", ".join(sorted(obj)[:5]) or "none"})')
    text = obj["text"]
    if not isinstance(text, str):
        raise BadLine(f'"text" is {type(text).__name__}, not a string')
    if not text.strip():
        raise BadLine('empty content ("text" is empty)')
    return text


def parse_conversation(obj: dict) -> list[dict]:
    """An SFT/LoRA record ``{"conversations": [{"role": ..., "content": ...}, ...]}``, optional first system turn."""
    if "conversations" not in obj:
        raise BadLine(f'missing key "conversations" (keys: {", ".join(sorted(obj)[:5]) or "none"})')
    conv = obj["conversations"]
    if not isinstance(conv, list) or not conv:
        raise BadLine('"conversations" must be a non-empty list')
    turns = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadLine(f'turn {i}: missing key "role" or "content"')
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise BadLine(f"turn {i}: unknown role {role!r} (expected one of: {', '.join(CHAT_ROLES)})")
        if role == "system" and i != 0:
            raise BadLine(f"turn {i}: a system turn may only come first")
        if not isinstance(content, str) or not content.strip():
            raise BadLine(f"turn {i} ({role}): empty content")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise BadLine("no assistant turn (nothing to learn from)")
    return turns


def parse_any_text(obj: dict) -> list[str]:
    """Every string a record holds, for either format (what the tokenizer trainer learns from)."""
    if "text" in obj:
        return [parse_text(obj)]
    if "conversations" in obj:
        return [s for t in parse_conversation(obj) for s in (t["role"], t["content"])]
    raise BadLine(f'missing key "text" or "conversations" (keys: {", ".join(sorted(obj)[:5]) or "none"})')


def token_dtype(vocab_size: int):
    """uint16 holds MiniMind-sized vocabularies (6400) at 2 bytes a token; bigger ones need uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def dist_rank() -> int:
    """This process's DDP rank (0 without DDP): only rank 0 prints and builds caches."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Progress:
    """Prints ``label: N lines, M tokens, X MB/s`` at most every ``PROGRESS_EVERY_S`` seconds (rank 0 only)."""

    def __init__(self, label: str, reader: JsonlReader):
        self.label, self.reader, self.verbose = label, reader, dist_rank() == 0
        self.t0 = self.last = time.time()

    def __call__(self, n_tokens: int):
        now = time.time()
        if self.verbose and now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            r = self.reader
            print(f"[{self.label}] {r.name}: {r.lineno:,} lines, {n_tokens:,} tokens, "
                  f"{r.bytes_read / 2**20 / (now - self.t0):.1f} MB/s", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.t0


# ----------------------------------------------------------------------------- pretraining

def cache_paths(path: Path, tokenizer: TinyMindTokenizer, cache_dir: Path) -> tuple[Path, Path, str]:
    """``(tokens.bin, meta.json, stale-glob)`` of a data file's token cache.

    The name carries a hash of the data file's path (two ``train.jsonl`` from different folders do not
    collide) and a key over its size, mtime, first and last MiB, the tokenizer and the cache layout:
    editing the data or retraining the tokenizer gives a new key, so the old cache is never misused.
    """
    st = path.stat()
    h = hashlib.sha256(f"v{CACHE_VERSION}|{st.st_size}|{st.st_mtime_ns}|{tokenizer.fingerprint}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        if st.st_size > 2**20:
            f.seek(max(2**20, st.st_size - 2**20))
            h.update(f.read())
    prefix = f"{path.stem}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    stem = f"{prefix}-{h.hexdigest()[:16]}"
    return cache_dir / f"{stem}.bin", cache_dir / f"{stem}.json", glob.escape(prefix) + "-*"


def read_cache_meta(bin_path: Path, meta_path: Path, tokenizer: TinyMindTokenizer) -> dict | None:
    """The cache's metadata if the cache is complete and matches ``tokenizer``, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = (meta["version"] == CACHE_VERSION and meta["tokenizer"] == tokenizer.fingerprint
              and bin_path.stat().st_size == meta["num_tokens"] * itemsize)
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_token_cache(path: Path, tokenizer: TinyMindTokenizer, bin_path: Path, meta_path: Path,
                      skip_bad_lines: bool = False) -> dict:
    """Stream ``path`` once and write every document as ``[1] + ids + [2]`` into one flat token file.

    Memory stays at one batch of ``BATCH_LINES`` lines, so MiniMind's 1.6 GB ``pretrain_hq.jsonl`` is fine.
    Written to ``*.tmp`` then moved into place; the ``.json`` metadata goes last, so a ``.json`` next to
    a ``.bin`` of the right size means the cache is complete.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    reader = JsonlReader(path, parse_text, skip_bad_lines)
    progress = Progress("tokenize", reader)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    n_docs = n_tokens = 0

    def write(texts, f):
        nonlocal n_docs, n_tokens
        flat = []
        for ids in tokenizer.encode_batch(texts):
            flat.append(bos)
            flat.extend(ids)
            flat.append(eos)
        np.asarray(flat, dtype=dtype).tofile(f)
        n_docs, n_tokens = n_docs + len(texts), n_tokens + len(flat)
        progress(n_tokens)

    with atomic_write(bin_path) as tmp, open(tmp, "wb") as f:
        batch = []
        for _, text in reader:
            batch.append(text)
            if len(batch) == BATCH_LINES:
                write(batch, f)
                batch = []
        if batch:
            write(batch, f)
        if n_docs == 0:
            skipped = f"; {reader.num_bad} bad line(s) skipped" if reader.num_bad else ""
            raise TinyMindError(f"{reader.name}: empty dataset (no usable lines{skipped})")
    meta = {"version": CACHE_VERSION, "data": reader.name, "dtype": np.dtype(dtype).name,
            "num_tokens": n_tokens, "num_docs": n_docs, "num_bad_lines": reader.num_bad,
            "first_bad_line": reader.first_bad, "tokenizer": tokenizer.fingerprint}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    dt = progress.elapsed()
    print(f"[tokenize] {reader.name}: {n_docs:,} docs -> {n_tokens:,} tokens in {dt:.1f}s "
          f"({reader.bytes_read / 2**20 / max(dt, 1e-6):.1f} MB/s), cache {display_path(bin_path)}", flush=True)
    return meta


class PretrainDataset(Dataset):
    """Packed pretraining windows over a cached token stream.

    All documents, each ``[1] + ids + [2]``, are concatenated and cut into ``len(self)`` full windows of
    ``max_seq_len`` tokens: nothing is padded, every token appears exactly once, in order. The few tokens
    after the last full window are dropped (``num_dropped_tokens``). A window may start in the middle of
    a document and span several: ``<|im_start|>``/``<|im_end|>`` tell the model where documents begin and end.
    Item ``i`` is ``(input_ids, labels)``, two LongTensors of shape (max_seq_len,) with labels == input_ids
    (the model shifts labels by one inside its loss).

    The cache lives in ``cache_dir`` (default ``dataset/.cache/``) and is rebuilt only when the data file or
    the tokenizer changes. Under DDP rank 0 builds it while the other ranks wait at a barrier.
    """

    def __init__(self, path, tokenizer: TinyMindTokenizer, max_seq_len: int = 256, cache_dir=None,
                 skip_bad_lines: bool = False):
        self.path = repo_path(path)
        if not self.path.is_file():
            raise TinyMindError(f"data file not found: {display_path(self.path)}")
        if max_seq_len < 2:
            raise TinyMindError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        cache_dir = repo_path(cache_dir if cache_dir is not None else "dataset/.cache")
        self.cache_path, meta_path, stale = cache_paths(self.path, tokenizer, cache_dir)

        dist_on, rank = torch.distributed.is_available() and torch.distributed.is_initialized(), dist_rank()
        meta = read_cache_meta(self.cache_path, meta_path, tokenizer)
        self.cache_built, error = False, None
        if rank == 0 and meta is None:
            try:
                meta = build_token_cache(self.path, tokenizer, self.cache_path, meta_path, skip_bad_lines)
                self.cache_built = True
                for old in cache_dir.glob(stale):  # caches of older versions of this same file
                    if old.name not in (self.cache_path.name, meta_path.name):
                        old.unlink(missing_ok=True)
            except Exception as e:  # still reach the barrier, so the other ranks do not hang
                error = e
        if dist_on:
            torch.distributed.barrier()
        if error is not None:
            raise error
        if meta is None:
            meta = read_cache_meta(self.cache_path, meta_path, tokenizer)
        if meta is None:
            raise TinyMindError(f"rank {rank}: no token cache {self.cache_path} after rank 0's build (see rank 0's "
                                "error; otherwise cache_dir is not on a filesystem every rank sees)")
        self.num_bad_lines = meta["num_bad_lines"]
        if self.num_bad_lines and not skip_bad_lines:  # cache built with skipping, now asked to be strict
            raise TinyMindError(f"{meta['first_bad_line']} (skip_bad_lines=True / --skip_bad_lines 1 skips such lines)")
        self.dtype = np.dtype(meta["dtype"])
        self.num_tokens, self.num_docs = meta["num_tokens"], meta["num_docs"]
        self.num_windows = self.num_tokens // max_seq_len
        self.num_dropped_tokens = self.num_tokens - self.num_windows * max_seq_len
        if self.num_windows == 0:
            raise TinyMindError(f"{display_path(self.path)}: only {self.num_tokens} tokens, "
                                f"fewer than one window of max_seq_len={max_seq_len}")
        self._tokens = None  # np.memmap opened lazily, so DataLoader workers each open their own
        if rank == 0:
            skipped = f", skipped {self.num_bad_lines} bad line(s) (first: {meta['first_bad_line']})" \
                if self.num_bad_lines else ""
            print(f"[pretrain] {display_path(self.path)}: {self.num_docs:,} docs, {self.num_tokens:,} tokens -> "
                  f"{self.num_windows:,} windows of {max_seq_len} (last {self.num_dropped_tokens} tokens dropped)"
                  f"{', cache reused' if not self.cache_built else ''}{skipped}", flush=True)

    def tokens(self) -> np.ndarray:
        """The whole cached token stream as a read-only memmap, shape (num_tokens,)."""
        if self._tokens is None:
            self._tokens = np.memmap(self.cache_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def __getstate__(self):  # pickling (spawned workers) must not copy the memmap's contents
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int):
        if i < 0:
            i += self.num_windows
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range ({self.num_windows} windows)")
        T = self.max_seq_len
        x = torch.from_numpy(self.tokens()[i * T:(i + 1) * T].astype(np.int64))  # (T,)
        return x, x.clone()


# ----------------------------------------------------------------------------- supervised fine-tuning

def chat_segments(turns: list[dict]) -> list[tuple[str, bool]]:
    """Cut a rendered ChatML conversation into ``(text, is_target)`` pieces, in order.

    Joined, the texts are exactly ``apply_chat_template(turns)``. Targets are each assistant content plus
    its ``<|im_end|>`` (so the model learns to stop); ``<|im_start|>assistant\\n`` and the ``\\n`` after
    ``<|im_end|>`` are context. The assistant content is encoded on its own, as generation produces it
    after the prompt ``...<|im_start|>assistant\\n``: training and inference see the same tokens.
    """
    segs, context = [], ""
    for t in turns:
        if t["role"] == "assistant":
            segs += [(context + "<|im_start|>assistant\n", False), (t["content"] + "<|im_end|>", True)]
            context = "\n"
        else:
            context += f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n"
    segs.append((context, False))
    return segs


def own_template_segments(tokenizer: TinyMindTokenizer, turns: list[dict]) -> list[tuple[str, bool]]:
    """``chat_segments`` for an imported model's own chat template (Llama 3's, Mistral's, Qwen3's, ...).

    The conversation is rendered once by the model's template; each assistant reply is found in that text
    (after the user turns before it, in order, and no earlier than the generation prompt chat would build
    for it, so a reply that repeats words of a header or a user turn is not taken for them; templates may
    trim the content, as Llama 3's does), and the
    target runs from the reply's first character through the end-of-turn token that follows it (one of the
    tokenizer's ``stop_ids`` or its eos token: ``<|eot_id|>``, ``</s>``, ``<|im_end|>``), so the model learns
    to stop where generation stops. Everything else, the template's headers and default system lines
    included, is context. A reply the rendered text does not contain is refused by name.
    """
    text = tokenizer.apply_chat_template(turns)
    stops = [t for t in {tokenizer.id_to_token(i) for i in (*tokenizer.stop_ids, tokenizer.eos_id)} if t]
    segs, done, cursor = [], 0, 0
    for i, t in enumerate(turns):
        content = t["content"].strip()
        if t["role"] == "system" or not content:   # templates move system lines about (Mistral: to the last turn)
            continue
        if t["role"] == "assistant":   # a reply starts no earlier than the prompt chat would give for it
            try:
                prompt = tokenizer.apply_chat_template(turns[:i], add_generation_prompt=True)
            except TinyMindError:   # a template that refuses the shorter conversation: search from the cursor
                prompt = ""
            if text.startswith(prompt):
                cursor = max(cursor, len(prompt))
        at = text.find(t["content"], cursor)   # as given (ChatML keeps it verbatim), else as trimmed
        if at >= 0:
            content = t["content"]
        else:
            at = text.find(content, cursor)
        if at < 0:
            raise TinyMindError(f"turn {i} ({t['role']}): the model's chat template does not write it as "
                                f"given ({content[:40]!r}...), so its tokens cannot be marked for the loss")
        cursor = at + len(content)
        if t["role"] != "assistant":
            continue
        ends = [e for e in (text.find(s, cursor) for s in stops) if e >= 0]
        if ends:   # through the end-of-turn token right after the reply (whitespace between is allowed)
            e = min(ends)
            stop = next(s for s in stops if text.startswith(s, e))
            if not text[cursor:e].strip():
                cursor = e + len(stop)
        segs += [(text[done:at], False), (text[at:cursor], True)]
        done = cursor
    segs.append((text[done:], False))
    return [(s, target) for s, target in segs if s]


def conversation_segments(tokenizer: TinyMindTokenizer, turns: list[dict]) -> list[tuple[str, bool]]:
    """``(text, is_target)`` pieces of one conversation: ChatML for TinyMind's tokenizer
    (``chat_segments``), the model's own template for an imported one (``own_template_segments``)."""
    if getattr(tokenizer, "chat", None) is None:
        return chat_segments(turns)
    return own_template_segments(tokenizer, turns)


class SFTDataset(Dataset):
    """Chat conversations with an assistant-only loss mask.

    Item ``i`` is ``(input_ids, labels)``, LongTensors of the same variable length t <= max_seq_len:
    ``labels`` equals ``input_ids`` on assistant tokens (content + end of turn) and -100 everywhere else.
    Longer conversations are cut at ``max_seq_len`` (counted in ``num_truncated``); one that keeps no
    assistant token after the cut is dropped (``num_dropped``). The file is tokenized once, in
    ``__init__``, into flat arrays (2 bytes a token plus 1 byte of mask).
    """

    def __init__(self, path, tokenizer: TinyMindTokenizer, max_seq_len: int = 512, skip_bad_lines: bool = False):
        if max_seq_len < 2:
            raise TinyMindError(f"max_seq_len must be at least 2, got {max_seq_len}")
        reader = JsonlReader(path, parse_conversation, skip_bad_lines)
        self.path, self.max_seq_len = reader.path, max_seq_len
        progress = Progress("sft", reader)
        ids_parts, mask_parts, lengths = [], [], []
        self.num_truncated = self.num_dropped = 0
        n_tokens = 0
        dtype = token_dtype(tokenizer.vocab_size)

        def add(convs):
            nonlocal n_tokens
            segs = [conversation_segments(tokenizer, c) for c in convs]
            encoded = iter(tokenizer.encode_batch([text for s in segs for text, _ in s]))
            for s in segs:
                ids, mask = [], []
                for _, is_target in s:
                    piece = next(encoded)
                    ids += piece
                    mask += [is_target] * len(piece)
                if len(ids) > max_seq_len:
                    self.num_truncated += 1
                    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
                    if not any(mask):  # every assistant token was cut: nothing left to learn
                        self.num_dropped += 1
                        continue
                ids_parts.append(np.asarray(ids, dtype=dtype))
                mask_parts.append(np.asarray(mask, dtype=bool))
                lengths.append(len(ids))
                n_tokens += len(ids)
            progress(n_tokens)

        batch = []
        for _, turns in reader:
            batch.append(turns)
            if len(batch) == BATCH_LINES:
                add(batch)
                batch = []
        if batch:
            add(batch)
        self.num_bad_lines = reader.num_bad
        if not lengths:
            why = [f"{n} {w}" for n, w in ((reader.num_bad, "bad line(s) skipped"),
                                           (self.num_dropped, "cut to nothing by max_seq_len")) if n]
            raise TinyMindError(f"{reader.name}: empty dataset (no usable conversations"
                                + (f"; {', '.join(why)})" if why else ")"))
        self.ids = np.concatenate(ids_parts)  # (num_tokens,) all conversations back to back
        self.mask = np.concatenate(mask_parts)  # (num_tokens,) True where the token is a target
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # item i = ids[offsets[i]:offsets[i+1]]
        self.num_tokens = int(self.offsets[-1])
        if dist_rank() != 0:
            return
        print(f"[sft] {reader.name}: {len(self):,} conversations, {self.num_tokens:,} tokens "
              f"({int(self.mask.sum()):,} with loss), {self.num_truncated} truncated at max_seq_len={max_seq_len}"
              + (f", {self.num_dropped} dropped" if self.num_dropped else "")
              + f", {progress.elapsed():.1f}s", flush=True)
        if reader.summary():
            print(f"[sft] {reader.summary()}", flush=True)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int):
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"conversation {i} out of range ({len(self)} conversations)")
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = torch.from_numpy(self.ids[a:b].astype(np.int64))  # (t,)
        labels = ids.masked_fill(~torch.from_numpy(self.mask[a:b]), IGNORE_INDEX)  # (t,)
        return ids, labels


def collate_batch(batch, pad_id: int = 0):
    """Right-pad ``[(input_ids, labels), ...]`` to the longest item.

    Returns ``input_ids`` (B, T) padded with ``pad_id``, ``labels`` (B, T) padded with -100 (padding is
    never a target), ``attention_mask`` (B, T) with 1 on real tokens and 0 on padding.
    """
    T = max(len(x) for x, _ in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, (x, y) in enumerate(batch):
        input_ids[b, :len(x)], labels[b, :len(y)], attention_mask[b, :len(x)] = x, y, 1
    return input_ids, labels, attention_mask


# ----------------------------------------------------------------------------- inspection CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description="Load a TinyMind data file, print its statistics and a sample "
                                                 "(builds the pretrain token cache as a side effect).")
    parser.add_argument("--data_path", default="dataset/pretrain_demo.jsonl", help="jsonl file to load")
    parser.add_argument("--mode", choices=["pretrain", "sft"], default=None,
                        help="dataset type; default: guessed from the first line (text -> pretrain)")
    parser.add_argument("--max_seq_len", type=int, default=None, help="window / truncation length "
                        "(default 256 for pretrain, 512 for sft)")
    parser.add_argument("--tokenizer_path", default="model/tokenizer.json", help="tokenizer.json to use")
    parser.add_argument("--cache_dir", default=None, help="pretrain token cache folder (default dataset/.cache)")
    parser.add_argument("--skip_bad_lines", type=int, default=0, help="1: skip and count bad lines instead of stopping")
    parser.add_argument("--show", type=int, default=1, help="how many items to print")
    args = parser.parse_args(argv)

    tok = load_tokenizer(args.tokenizer_path)
    mode = args.mode
    if mode is None:
        first = next(iter(JsonlReader(args.data_path, lambda o: o, skip_bad_lines=True)), (0, {}))[1]
        mode = "sft" if "conversations" in first else "pretrain"
    if mode == "pretrain":
        ds = PretrainDataset(args.data_path, tok, args.max_seq_len or 256, args.cache_dir, bool(args.skip_bad_lines))
    else:
        ds = SFTDataset(args.data_path, tok, args.max_seq_len or 512, bool(args.skip_bad_lines))
    for i in range(min(args.show, len(ds))):
        x, y = ds[i]
        print(f"--- item {i}: {len(x)} tokens, {int((y != IGNORE_INDEX).sum())} with loss")
        print(tok.decode(x, skip_special_tokens=False))
        if mode == "sft":
            print(f"--- item {i}, loss on: {tok.decode(x[y != IGNORE_INDEX], skip_special_tokens=False)!r}")
    return ds


if __name__ == "__main__":
    run_main(main)
