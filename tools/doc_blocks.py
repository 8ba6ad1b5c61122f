"""Generated blocks in the docs: text a script computes, kept in a markdown file between two markers.

One syntax for every generated block:

    <!-- SOURCE:NAME -->
    | a table the script printed |
    <!-- /SOURCE:NAME -->

SOURCE says which script renders the block (``doc_numbers``: dev/doc_numbers.py, parameter counts
computed from the code; ``lora_experiments``: dev/lora_experiments.py, tables of the committed
experiment results), NAME which of its tables it is. The markers are HTML comments, so a markdown
viewer shows only the table. A script rewrites the bodies (``fill_blocks``); a test reads them
(``find_blocks``) and fails when one differs from what the script would write.

What this file implements:
- ``start_marker`` / ``end_marker`` / ``render_block``: the two markers and a whole block;
- ``find_blocks``: the (name, body) of every block of one source in a text;
- ``fill_blocks``: the text with the blocks of one source rewritten, and the names whose body changed.
"""
from __future__ import annotations

import re

from model.common import TinyMindError


def start_marker(source: str, name: str) -> str:
    return f"<!-- {source}:{name} -->"


def end_marker(source: str, name: str) -> str:
    return f"<!-- /{source}:{name} -->"


def render_block(source: str, name: str, body: str) -> str:
    """The whole block: opening marker, the body (without surrounding blank lines), closing marker."""
    return f"{start_marker(source, name)}\n{body.strip()}\n{end_marker(source, name)}"


def _block_re(source: str) -> re.Pattern:
    """Group 1: NAME, group 2: the body (the lines between the markers, with their newlines)."""
    s = re.escape(source)
    return re.compile(rf"<!-- {s}:(\w+) -->\n(.*?)<!-- /{s}:\1 -->", re.S)


def _check_closed(text: str, source: str, where: str) -> None:
    """Every opening marker of ``source`` has its closing marker (else its block would be silently skipped)."""
    opened = re.findall(rf"<!-- {re.escape(source)}:(\w+) -->", text)
    closed = [m.group(1) for m in _block_re(source).finditer(text)]
    for name in opened:
        if name not in closed:
            raise TinyMindError(f"{where}: {start_marker(source, name)} has no closing {end_marker(source, name)} "
                                f"on a line after it")
        closed.remove(name)


def find_blocks(text: str, source: str, where: str = "text") -> list[tuple[str, str]]:
    """(NAME, body) of every block of ``source`` in ``text``, in order; ``where`` names the file in errors."""
    _check_closed(text, source, where)
    return [(m.group(1), m.group(2)) for m in _block_re(source).finditer(text)]


def fill_blocks(text: str, source: str, bodies: dict[str, str], where: str = "text") -> tuple[str, list[str]]:
    """``text`` with the body of every ``source`` block whose NAME is in ``bodies`` set to ``bodies[NAME]``,
    and the NAMEs whose body changed (compared without surrounding blank lines). Blocks of other names,
    and everything outside the blocks, are left as they are."""
    _check_closed(text, source, where)
    changed = []

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in bodies:
            return m.group(0)
        if m.group(2).strip() != bodies[name].strip():
            changed.append(name)
        return render_block(source, name, bodies[name])

    return _block_re(source).sub(sub, text), changed
