"""Which layers of a model a LoRA adapter goes on: the candidates, and the ``targets`` syntax.

    "q_proj,v_proj"      a comma list of module-name suffixes: every candidate named so or ending ".q_proj"
    "all-linear"         every linear candidate
    "re:<regex>"         every linear candidate whose full module name matches (``fullmatch``)

Candidates are the linear layers (or existing LoRA wrappers) except anything sharing an embedding's weight
(the tied lm_head) and ``lm_head`` itself: the vocabulary projection is never adapted. The token embedding
is a candidate too, but only by name in the list (``embed_tokens``), never by ``all-linear`` or a regex.
A suffix or regex that matches nothing is an error naming what exists, never a silent no-op.

``model/model_lora.py::find_targets`` calls ``select_targets`` with what only it knows (which modules are
its wrappers, which are embeddings); this file imports nothing of model_lora.
"""
from __future__ import annotations

import re
from typing import Callable

import torch.nn as nn

from model.common import TinyMindError


def select_targets(core: nn.Module, targets: str, wrapped: set[str], is_embedding: Callable) -> list[str]:
    """Module names of ``core`` that ``targets`` selects, in model order. ``wrapped``: the modules that are
    LoRA wrappers already (their own ``base`` is no candidate again); ``is_embedding(module)``: a token
    embedding, plain or wrapped."""
    tied = {id(m.weight) for m in core.modules() if isinstance(m, nn.Embedding)}
    cands = [n for n, m in core.named_modules() if n in wrapped or (
        isinstance(m, (nn.Linear, nn.Embedding)) and n.rpartition(".")[0] not in wrapped and n != "lm_head"
        and (isinstance(m, nn.Embedding) or id(m.weight) not in tied))]
    linear = [n for n in cands if not is_embedding(core.get_submodule(n))]
    if targets == "all-linear":
        return linear
    if targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as e:
            raise TinyMindError(f"LoRA targets {targets!r}: bad regex ({e})") from None
        names = [n for n in linear if pattern.fullmatch(n)]
        if not names:
            raise TinyMindError(f"LoRA targets {targets!r} match no layer (names look like {cands[:2]})")
        return names
    names = []
    for suffix in [t.strip() for t in targets.split(",") if t.strip()]:
        hits = [n for n in cands if n == suffix or n.endswith("." + suffix)]
        if not hits:
            known = sorted({n.rpartition(".")[2] for n in cands})
            raise TinyMindError(f"LoRA target {suffix!r} matches no layer; known: {', '.join(known)}")
        names += [n for n in hits if n not in names]
    return names
