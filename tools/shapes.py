"""Models with their real parameter shapes and no computed values: for counting parameters and drawing
layer sizes in seconds, whatever the preset.

- ``shapes_only``: a context in which ``torch.nn.init``'s random initialisers do nothing;
- ``shapes_only_model``: a TinyMindForCausalLM of a preset built inside it.

dev/doc_numbers.py counts the parameters the docs quote on such models; dev/make_figures.py reads the
layer sizes it draws from one.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from model.model import TinyMindForCausalLM, get_config


@contextmanager
def shapes_only():
    """Build modules with the random initialisers turned off: shapes are all we count. Weights are then
    ``torch.empty`` memory that is never touched (the OS maps the pages only when written), so even the
    104M ``base`` preset costs almost nothing to build."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def shapes_only_model(preset: str) -> TinyMindForCausalLM:
    """A model of ``preset``: every parameter with its real shape, uninitialised values. The context length
    only sizes the RoPE tables, which are buffers, not parameters: a short one skips computing them."""
    with shapes_only():
        return TinyMindForCausalLM(get_config(preset, max_position_embeddings=2))
