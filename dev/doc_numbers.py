"""Parameter counts quoted in the docs, computed from the code (never typed by hand).

What this file implements:
- ``preset_table``: every preset in ``model.model.PRESETS`` -- its shape, total parameters (tied
  embedding counted once), the embedding's share and the parameters of one block;
- ``lora_table``: trainable LoRA parameters and their share of the model for r in {4, 8, 16} (of the
  total with the adapter, as trainer/train_lora.py prints it, and of the base alone), on the
  ``tiny`` and ``small`` presets, for several target sets (the default list, ``all-linear``, attention
  only, and the layers MiniMind's "square matrices only" rule would pick);
- ``lora_layer_table``: the shapes of A and B for each target layer of one block (``tiny``, r = 8);
- ``variant_table``: trainable parameters of every variant in model/lora_variants on ``tiny`` and ``small``,
  with r = 8, alpha = 16 (LoRAConfig's defaults; train_lora.py's are 16 and 32) and its other flags' defaults;
- ``scaling_table``: ``LoRAConfig.scaling`` for alpha = 16 across ranks, plain and rsLoRA;
- ``render_blocks`` / ``--update``: the docs hold these tables in ``<!-- doc_numbers:NAME -->`` blocks
  (tools/doc_blocks.py); ``--update`` rewrites them there, and tests/test_docs.py fails when they differ.
- ``spread_blocks``: the README's tables of the committed three-seed run (docs/results/spread_report.json,
  written by ``python scripts/run_pipeline.py --seeds 42,1,2``): ``<!-- spread:NAME -->`` blocks in README.md,
  README_zh.md and docs/*.md, rendered by tools/spread.py::doc_tables and rewritten by ``--update`` too;
- ``figure_value`` / ``update_figures``: numbers inside sentences of the docs and READMEs, marked
  ``<!-- n: FILE PATH FORMAT -->1.24x<!-- /n -->`` (tools/doc_blocks.py), rendered from the committed
  result file docs/results/FILE; ``--update`` rewrites them too, and tests/test_docs.py fails when one differs.
- ``chapter_footer`` / ``update_footers``: the last line of every chapter docs/NN-*.md, its links to the
  next and the previous chapter, derived from the numbered files present (a new chapter joins the chain
  with ``--update``; tests/test_docs.py fails when a footer is not the derived one).
- ``refresh_line_counts`` / ``--line_counts``: rewrite every stated line count in docs/*.md (``（path，N 行）``)
  to the file's current length (tests/test_docs.py fails when one is more than 10% off).

Models are built with the random initialisers switched off (tools/shapes.py): the parameter shapes are the
real ones, the values are never computed, so this runs in seconds.

    python dev/doc_numbers.py            # print the tables
    python dev/doc_numbers.py --update   # rewrite the marked tables and inline figures in the docs
    python dev/doc_numbers.py --check    # exit 1 if a marked table in docs/*.md is out of date
    python dev/doc_numbers.py --line_counts   # refresh the line counts the docs state
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from model.common import ROOT, TinyMindError, atomic_write_text, run_main
from model.model import PRESETS, get_config
from model.lora_variants import config_from_args, get_variant, variants
from model.model_lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from tools.doc_blocks import fill_blocks, fill_figures, lookup, render_block, render_figure
from tools.shapes import shapes_only, shapes_only_model
from tools.spread import doc_tables
from trainer import train_lora

RANKS = (4, 8, 16)
LORA_PRESETS = ("tiny", "small")
# (label in the table, targets string passed to apply_lora)
TARGET_SETS = (
    ("default (7 kinds)", DEFAULT_TARGETS),
    ("all-linear", "all-linear"),
    ("q_proj,v_proj", "q_proj,v_proj"),
    ("square only: q_proj,o_proj", "q_proj,o_proj"),
)
# the form tests/test_docs.py reads: （path，N 行） or (path, about N lines in Chinese)
LINE_COUNT_RE = re.compile(r"([（(]\s*`?)([\w./-]+\.\w+)(`?\s*[，,]\s*约?\s*)(\d+)(\s*行\s*[）)])")
SOURCE = "doc_numbers"   # the blocks' SOURCE in <!-- SOURCE:NAME --> (tools/doc_blocks.py)
SPREAD_SOURCE = "spread"  # the blocks of the committed spread report
SPREAD_REPORT = ROOT / "docs" / "results" / "spread_report.json"


def fmt_m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def preset_table() -> str:
    rows = ["| preset | hidden | layers | heads (q / kv) | intermediate | context | parameters | "
            "embedding share | one block |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in PRESETS:
        model = shapes_only_model(name)
        cfg = get_config(name)
        total = model.num_parameters()
        emb = model.model.embed_tokens.weight.numel()
        block = sum(p.numel() for p in model.model.layers[0].parameters())
        rows.append(f"| `{name}` | {cfg.hidden_size} | {cfg.num_hidden_layers} | {cfg.num_attention_heads} / "
                    f"{cfg.num_key_value_heads} | {cfg.intermediate_size} | {cfg.max_position_embeddings} | "
                    f"{total:,} ({fmt_m(total)}) | {100 * emb / total:.1f}% | {block:,} |")
    return "\n".join(rows)


def lora_counts(preset: str, rank: int, targets: str) -> dict:
    """What apply_lora reports, plus the base model's own size."""
    model = shapes_only_model(preset)
    base = model.num_parameters()
    with shapes_only():
        info = apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets))
    return dict(base=base, trainable=info["trainable"], total=info["total"], layers=len(info["wrapped"]))


def lora_table() -> str:
    rows = ["| preset | targets | wrapped layers | r | trainable | % of total | % of base | fp32 adapter |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for preset in LORA_PRESETS:
        for label, targets in TARGET_SETS:
            for r in RANKS:
                c = lora_counts(preset, r, targets)
                kib = c["trainable"] * 4 / 1024
                rows.append(f"| `{preset}` | {label} | {c['layers']} | {r} | {c['trainable']:,} | "
                            f"{100 * c['trainable'] / c['total']:.2f}% | {100 * c['trainable'] / c['base']:.2f}% | "
                            f"{kib:,.0f} KiB |")
    return "\n".join(rows)


def lora_layer_table(preset: str = "tiny", rank: int = 8) -> str:
    model = shapes_only_model(preset)
    block = model.model.layers[0]
    rows = [f"| layer (`{preset}`, r = {rank}) | W [out, in] | A [r, in] | B [out, r] | W parameters | "
            f"A + B = r·(in + out) | ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        lin = block.get_submodule(name)
        o, i = lin.out_features, lin.in_features
        lora = rank * (i + o)
        rows.append(f"| `{name.split('.')[-1]}` | [{o}, {i}] | [{rank}, {i}] | [{o}, {rank}] | {o * i:,} | "
                    f"{lora:,} | {100 * lora / (o * i):.1f}% |")
    return "\n".join(rows)


def variant_counts(preset: str, name: str) -> tuple[int, int, int]:
    """(rank used, trainable, base parameters) of variant ``name``: r = 8, alpha = 16, other flags default."""
    args = train_lora.build_parser().parse_args(["--lora_variant", name, "--lora_rank", "8", "--lora_alpha", "16"])
    cfg = config_from_args(args, LoRAConfig(rank=8, alpha=16.0, targets=DEFAULT_TARGETS))
    model = shapes_only_model(preset)
    base = model.num_parameters()
    with shapes_only():
        info = apply_lora(model, cfg, adapter_name="default")
    count = get_variant(name).count_trainable
    return cfg.rank, (count(model, "default") if count else info["trainable"]), base


def variant_table() -> str:
    rows = ["| variant | r | `tiny` trainable | % of base | `small` trainable | % of base |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in variants():
        cells = []
        for preset in LORA_PRESETS:
            rank, n, base = variant_counts(preset, name)
            cells.append(f"{n:,} | {100 * n / base:.2f}%")
        rows.append(f"| `{name}` | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scaling_table(alpha: float = 16.0, ranks=(1, 4, 8, 16, 64)) -> str:
    """LoRAConfig.scaling for one alpha across ranks: alpha / r against rsLoRA's alpha / sqrt(r)."""
    rows = [f"| r (alpha = {alpha:g}) | " + " | ".join(str(r) for r in ranks) + " |",
            "| --- |" + " --- |" * len(ranks),
            "| alpha / r | " + " | ".join(f"{LoRAConfig(rank=r, alpha=alpha).scaling:.4g}" for r in ranks) + " |",
            "| rsLoRA: alpha / sqrt(r) | " + " | ".join(f"{LoRAConfig(rank=r, alpha=alpha, use_rslora=True).scaling:.4g}"
                                                       for r in ranks) + " |"]
    return "\n".join(rows)


def render_blocks() -> dict[str, str]:
    """Name -> markdown table, as the docs hold them between their markers."""
    return {"presets": preset_table(), "lora": lora_table(), "lora_layers": lora_layer_table(),
            "lora_scaling": scaling_table(), "lora_variants": variant_table()}


def spread_blocks(path=SPREAD_REPORT) -> dict[str, str]:
    """Name -> markdown table of the committed spread report (tools/spread.py::doc_tables)."""
    return doc_tables(json.loads(Path(path).read_text(encoding="utf-8")))


def update_docs(blocks: dict[str, str], write: bool, source: str = SOURCE) -> list[str]:
    """Rewrite (or, with write=False, just compare) every marked block of ``source`` in the docs and
    READMEs; returns the stale ones."""
    stale = []
    for doc in figure_docs():
        text = doc.read_text(encoding="utf-8")
        new, changed = fill_blocks(text, source, blocks, where=str(doc.relative_to(ROOT)))
        stale += [f"{doc.relative_to(ROOT)}: {name}" for name in changed]
        if write and new != text:
            atomic_write_text(doc, new)
    return stale


RESULTS = ROOT / "docs" / "results"


def figure_docs() -> list[Path]:
    """The files whose sentences may quote a result: docs/*.md and the two READMEs."""
    return sorted((ROOT / "docs").glob("*.md")) + [p for p in (ROOT / "README.md", ROOT / "README_zh.md") if p.exists()]


def figure_value(file: str, path: str, fmt: str, cache: dict | None = None) -> str:
    """The text an inline figure shows: docs/results/FILE's value at PATH, formatted with FMT."""
    where = f"<!-- n: {file} {path} {fmt} -->"
    source = (RESULTS / file).resolve()
    if RESULTS.resolve() not in source.parents or source.suffix != ".json" or not source.is_file():
        raise TinyMindError(f"{where}: {file} is not a JSON file under docs/results/")
    cache = {} if cache is None else cache
    if source not in cache:
        cache[source] = json.loads(source.read_text(encoding="utf-8"))
    try:
        return render_figure(lookup(cache[source], path, where), fmt)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise TinyMindError(f"{where}: cannot format {fmt!r}: {e}") from None


def update_figures(write: bool) -> list[str]:
    """Re-render (or, with write=False, compare) every inline figure; returns the ones that differ."""
    stale, cache = [], {}
    for doc in figure_docs():
        text = doc.read_text(encoding="utf-8")
        new, changed = fill_figures(text, lambda f, p, fmt: figure_value(f, p, fmt, cache))
        stale += [f"{doc.relative_to(ROOT)}: {c}" for c in changed]
        if write and new != text:
            atomic_write_text(doc, new)
    return stale


def chapter_files() -> list[Path]:
    """docs/NN-*.md in reading order."""
    return sorted(p for p in (ROOT / "docs").glob("*.md") if re.match(r"\d\d-", p.name))


def chapter_label(path: Path) -> str:
    """"04 LoRA" from the title "# 04 · LoRA：从公式到一行行代码" (the part before the first colon)."""
    title = path.read_text(encoding="utf-8").splitlines()[0]
    m = re.match(r"#\s*(\d\d)\s*·\s*(.+)", title)
    if not m:
        raise TinyMindError(f"docs/{path.name}: the first line must be '# NN · title'")
    return f"{m.group(1)} {re.split('[：:]', m.group(2))[0].strip()}"


def chapter_footer(chapters: list[Path], i: int) -> str:
    """The prev/next line of chapter i: 下一章 (if any), 上一章 (if any); the last one leads back to 00."""
    link = lambda k: f"[{chapter_label(chapters[k])}]({chapters[k].name})"
    parts = []
    if i + 1 < len(chapters):
        parts.append(f"下一章：{link(i + 1)}。")
    if i > 0:
        parts.append(f"上一章：{link(i - 1)}。")
    if i + 1 == len(chapters) and i > 0:
        parts.append(f"回到 {link(0)}。")
    return "".join(parts)


FOOTER_RE = re.compile(r"\n---\n\n(下一章|上一章)[^\n]*\n*\Z")


def update_footers(write: bool) -> list[str]:
    """Set (or, with write=False, compare) each chapter's last line to ``chapter_footer``; returns the
    chapters whose footer differed. A chapter without one gets it appended after a rule."""
    chapters, stale = chapter_files(), []
    for i, doc in enumerate(chapters):
        text = doc.read_text(encoding="utf-8")
        body = FOOTER_RE.sub("", text).rstrip("\n")
        new = f"{body}\n\n---\n\n{chapter_footer(chapters, i)}\n"
        if new != text:
            stale.append(f"{doc.relative_to(ROOT)}: footer")
            if write:
                atomic_write_text(doc, new)
    return stale


def table_line_counts(line: str) -> list[tuple[str, int]] | None:
    """The (file, stated lines) pairs of a README core-files row, ``| `a/x.py`, `y.py` | 10, 20 | ... |`` (a
    bare name is in the folder of the one before it); None for any other line or a row without counts."""
    cells = line.split("|")
    if len(cells) < 4 or not re.fullmatch(r"\s*\d[\d, ]*", cells[2]):
        return None
    names, counts = re.findall(r"`([^`]+)`", cells[1]), [int(c) for c in re.findall(r"\d+", cells[2])]
    if not names or len(names) != len(counts):
        return None
    paths, folder = [], ""
    for name in names:
        path = name if "/" in name else folder + name
        folder = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
        paths.append(path)
    return list(zip(paths, counts))


def refresh_table_line_counts(doc: Path) -> list[str]:
    """The README's core-files table: each row's line counts set to the files' current lengths."""
    changed, lines = [], doc.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        pairs = table_line_counts(line)
        if not pairs or not all((ROOT / f).is_file() for f, _ in pairs):
            continue
        real = [len((ROOT / f).read_text(encoding="utf-8").splitlines()) for f, _ in pairs]
        changed += [f"{doc.name}: {f} {n} -> {r}" for (f, n), r in zip(pairs, real) if n != r]
        cells = line.split("|")
        cells[2] = " " + ", ".join(map(str, real)) + " "
        lines[i] = "|".join(cells)
    if changed:
        atomic_write_text(doc, "\n".join(lines))
    return changed


def refresh_line_counts() -> list[str]:
    """Set every stated line count in docs/*.md (and the READMEs' core-files tables) to the cited file's
    current length; returns what changed."""
    changed = []
    for doc in (ROOT / "README.md", ROOT / "README_zh.md"):
        if doc.exists():
            changed += refresh_table_line_counts(doc)
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text(encoding="utf-8")

        def sub(m):
            file = ROOT / m.group(2)
            if not file.is_file():
                return m.group(0)
            real = len(file.read_text(encoding="utf-8").splitlines())
            if int(m.group(4)) != real:
                changed.append(f"{doc.relative_to(ROOT)}: {m.group(2)} {m.group(4)} -> {real}")
            return f"{m.group(1)}{m.group(2)}{m.group(3)}{real}{m.group(5)}"

        new = LINE_COUNT_RE.sub(sub, text)
        if new != text:
            atomic_write_text(doc, new)
    return changed


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the parameter-count tables the docs quote, computed from the code.")
    p.add_argument("--update", action="store_true", help="rewrite the <!-- doc_numbers:NAME --> tables in docs/*.md "
                   "the inline figures <!-- n: FILE PATH FORMAT --> in docs/*.md and the READMEs, "
                   "and each chapter's prev/next footer")
    p.add_argument("--check", action="store_true", help="exit 1 when a marked table in docs/*.md is out of date")
    p.add_argument("--line_counts", action="store_true",
                   help="rewrite the line counts stated in docs/*.md to the files' current lengths, then exit")
    args = p.parse_args(argv)
    if args.line_counts:
        for line in refresh_line_counts() or ["line counts: nothing to change"]:
            print(line)
        return None
    blocks = render_blocks()
    for name, table in blocks.items():
        print(render_block(SOURCE, name, table) + "\n")
    if args.update or args.check:
        stale = (update_docs(blocks, write=args.update) + update_figures(write=args.update)
                 + update_footers(write=args.update))
        if SPREAD_REPORT.is_file():
            stale += update_docs(spread_blocks(), write=args.update, source=SPREAD_SOURCE)
        verb = "updated" if args.update else "out of date"
        print(f"{verb}: {', '.join(stale) if stale else 'nothing'}")
        if args.check and stale:
            sys.exit(1)
    return blocks


if __name__ == "__main__":
    run_main(main)
