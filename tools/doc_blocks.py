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
- ``fill_blocks``: the text with the blocks of one source rewritten, and the names whose body changed;
- ``find_figures`` / ``fill_figures`` / ``lookup``: numbers inside sentences, each marked with the JSON
  file and key it comes from (see "inline figures" below).
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


# ------------------------------------------------------------------------------- inline figures
#
# A number quoted inside a sentence is kept between two markers that name where it comes from:
#
#     LoRA 一步快 <!-- n: bench.json measurements/lora_step/rows/0/value {:.2f}x -->1.24x<!-- /n -->
#
# FILE is a JSON file under docs/results/, PATH walks it ("/" between keys; a number indexes a list;
# ``key=value`` picks the list element whose ``key`` is ``value``), FORMAT is a Python format string applied
# to what PATH finds ("{:.1%}" prints 0.587 as 58.7%). A script rewrites the text between the markers
# (``fill_figures``); a test fails when it differs (``find_figures`` + ``render_figure``).

FIGURE_RE = re.compile(r"<!-- n: (\S+) (\S+) (.+?) -->(.*?)<!-- /n -->")


def find_figures(text: str) -> list[tuple[str, str, str, str]]:
    """(file, path, format, shown text) of every inline figure in ``text``, in order."""
    return [m.groups() for m in FIGURE_RE.finditer(text)]


def lookup(data, path: str, where: str = "figure"):
    """The value at ``path`` ("a/b/0/key=value/c") inside parsed JSON ``data``."""
    value = data
    for part in path.split("/"):
        if isinstance(value, list) and "=" in part:
            key, want = part.split("=", 1)
            found = [v for v in value if isinstance(v, dict) and str(v.get(key)) == want]
            if not found:
                raise TinyMindError(f"{where}: no element with {key} = {want} at {part!r} of {path}")
            value = found[0]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise TinyMindError(f"{where}: {path} has no {part!r}")
    return value


def render_figure(value, fmt: str) -> str:
    return fmt.format(value)


def fill_figures(text: str, resolve) -> tuple[str, list[str]]:
    """``text`` with every inline figure's shown text set to ``resolve(file, path, format)``, and a
    description of each figure that changed."""
    changed = []

    def sub(m: re.Match) -> str:
        file, path, fmt, shown = m.groups()
        new = resolve(file, path, fmt)
        if new != shown:
            changed.append(f"{file} {path}: {shown} -> {new}")
        return f"<!-- n: {file} {path} {fmt} -->{new}<!-- /n -->"

    return FIGURE_RE.sub(sub, text), changed
