"""TinyMind's tokenizer: a thin wrapper over a byte-level BPE ``tokenizers.Tokenizer``.

Implements:
- ``SPECIAL_TOKENS``: ``<|endoftext|>`` = 0 (padding), ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, then a few
  reserved specials. Ids 0/1/2 are the same as MiniMind's, so MiniMind-format data and checkpoints line up.
- ``TinyMindTokenizer``: ``encode`` / ``encode_batch`` / ``decode`` and ``apply_chat_template`` (ChatML);
  ``CHAT_TEMPLATE_JINJA``: the same template for transformers.
- with an imported model's chat setup (model/chat_template.py: its Jinja template, special tokens and
  end-of-turn ids, read from the files beside its ``tokenizer.json``), the same methods with its own ids
  and its own template.
- ``load_tokenizer(path=None)``: reads ``model/tokenizer.json`` (trained by ``trainer/train_tokenizer.py``),
  or an imported model's tokenizer with its own chat setup; ``load_model_tokenizer``: the same, checked
  against the vocabulary of the model it is for.

Byte-level BPE means every string round-trips exactly: text is first turned into UTF-8 bytes, each byte is
a base token, and merges only glue bytes together, so emoji or a script the tokenizer never saw still encode
(as several byte tokens) and decode back unchanged. The special token strings are "added tokens": the
tokenizer cuts them out of the text before BPE runs, so ``"<|im_start|>"`` inside a rendered chat always
becomes the single id 1.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer

from model.chat_template import OwnChat, compile_template, read_own_chat, render_template
from model.common import TinyMindError, atomic_write, repo_path

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Reserved specials keep a few ids free for later uses (tool calls, thinking, ...) without retraining.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN] + [f"<|reserved_{i}|>" for i in range(5)]
DEFAULT_TOKENIZER_PATH = "model/tokenizer.json"
CHAT_ROLES = ("system", "user", "assistant")
# The same ChatML rendering as ``TinyMindTokenizer.apply_chat_template``, written in Jinja for transformers'
# ``tokenizer_config.json`` (``scripts/convert_model.py`` exports it; a test checks both give the same string).
CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TinyMindTokenizer:
    """Byte-level BPE with TinyMind's special ids and the ChatML chat template; or, with ``chat``, an
    imported model's tokenizer with its own special tokens and chat template."""

    pad_token, bos_token, eos_token = PAD_TOKEN, BOS_TOKEN, EOS_TOKEN

    def __init__(self, tokenizer: Tokenizer, path: str | os.PathLike | None = None, chat: OwnChat | None = None):
        self.tokenizer = tokenizer
        self.path = Path(path) if path is not None else None
        self.chat = chat
        where = path if path is not None else "tokenizer"
        if chat is None:
            # The whole pipeline (pretrain documents, chat template, padding) relies on these three ids.
            for want_id, tok in enumerate((PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)):
                got = tokenizer.token_to_id(tok)
                if got != want_id:
                    raise TinyMindError(f"{where}: special token {tok} has id {got}, expected {want_id} "
                                        "(retrain it with trainer/train_tokenizer.py)")
            self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
            self.stop_ids = (2,)
        else:
            self._template = compile_template(chat.template)
            ids = {}
            for key, text in chat.specials.items():
                ids[key] = tokenizer.token_to_id(text)
                if ids[key] is None:
                    raise TinyMindError(f"{where}: its {key} {text!r} is not a token of the tokenizer")
            if "eos_token" not in ids:
                raise TinyMindError(f"{where}: the tokenizer config names no eos_token")
            self.pad_token, self.bos_token, self.eos_token = (chat.specials.get(k) for k in
                                                              ("pad_token", "bos_token", "eos_token"))
            self.eos_id, self.bos_id = ids["eos_token"], ids.get("bos_token")   # bos: None for Qwen
            self.pad_id = ids.get("pad_token", self.eos_id)   # only ever masked out
            # a reply ends at any of the model's end-of-turn ids (Llama 3: <|eot_id|>, <|eom_id|>, ...)
            self.stop_ids = chat.stop_ids or (self.eos_id,)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Short digest of the full tokenizer definition: data caches built with another tokenizer are stale.
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TinyMindTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens=True`` gives a pretraining document ``[1] + ids + [2]``."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not add_special_tokens:
            return ids
        return [*([] if self.bos_id is None else [self.bos_id]), *ids, self.eos_id]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for many texts at once (the Rust side runs them in parallel): used by the loaders."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, a 1-D tensor or array); special tokens are dropped unless asked for."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation as ChatML, exactly::

            <|im_start|>{role}\\n{content}<|im_end|>\\n      (for each message)
            <|im_start|>assistant\\n                          (if add_generation_prompt)

        An imported model's tokenizer renders its own template instead (``render_template``).
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TinyMindError(f"chat message {i}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        if self.chat is not None:
            return render_template(self._template, self.chat, [dict(m) for m in messages], add_generation_prompt)
        parts = [f"{BOS_TOKEN}{m['role']}\n{m['content']}{EOS_TOKEN}\n" for m in messages]
        if add_generation_prompt:
            parts.append(f"{BOS_TOKEN}assistant\n")
        return "".join(parts)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` through ``atomic_write``."""
        path = repo_path(path)
        with atomic_write(path) as tmp:
            self.tokenizer.save(str(tmp))
        return path


def load_tokenizer(path: str | os.PathLike | None = None) -> TinyMindTokenizer:
    """Load ``model/tokenizer.json`` (or ``path``); a missing or unreadable file is a ``TinyMindError``.
    A chat template stored beside it (``read_own_chat``: an imported model's) comes with it."""
    path = repo_path(path if path is not None else DEFAULT_TOKENIZER_PATH)
    if not path.is_file():
        raise TinyMindError(f"tokenizer not found: {path} (train one with: python trainer/train_tokenizer.py)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # truncated JSON, not a tokenizer file, unknown model type, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TinyMindError(f"{path} is not a readable tokenizer file ({msg})") from None
    chat = read_own_chat(path)
    if chat is not None and chat.template == CHAT_TEMPLATE_JINJA:   # TinyMind's own ChatML, exported and back
        chat = None
    return TinyMindTokenizer(tok, path, chat)


def load_model_tokenizer(path: str | os.PathLike, vocab_size: int, model_name: str) -> TinyMindTokenizer:
    """``load_tokenizer(path)`` for a model of ``vocab_size`` rows (named ``model_name`` in the error),
    refused when the tokenizer has more tokens than that: not the tokenizer the model was trained with."""
    tok = load_tokenizer(path)
    if len(tok) > vocab_size:
        raise TinyMindError(f"{path} has {len(tok)} tokens but {model_name} only {vocab_size}: "
                            "not the tokenizer this model was trained with")
    return tok
