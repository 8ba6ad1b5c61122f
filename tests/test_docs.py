"""The docs cannot silently drift from the code.

Checks, over docs/*.md and README.md / README_zh.md:
- every `path::Symbol` reference names a file that exists and a symbol defined in it
  (a top-level def / class / assignment, or ``Class.method`` / ``Class.attr``);
- every stated line count "（path，N 行）" is within 10% of the file's real line count;
- every chapter docs/0N-*.md opens with a "核心文件" list that cites at least one symbol;
- every code block marked ``<!-- code: path -->`` quotes that file verbatim: each of its lines (stripped)
  is a line of the file, in the same order (a line ``...`` marks an elision);
- every local link and image in the docs points to a file that exists;
- the tables in ``<!-- doc_numbers:NAME -->`` blocks (tools/doc_blocks.py) equal what dev/doc_numbers.py prints
  (parameter counts and LoRA percentages computed from the code);
- the evaluation tables in docs/04-lora.md and README.md equal the committed report
  docs/results/eval_report.md, row for row.

Everything is parsed with ``ast`` (no model is built except on the meta device), so this runs in seconds.
"""
import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# `model/model_lora.py::LoRALinear.merge` inside backticks (the path must end in .py).
SYMBOL_REF = re.compile(r"`([\w./-]+\.py)::([A-Za-z_][\w.]*)`")
# （model/model_lora.py，312 行） -- full-width or ASCII parentheses and comma.
LINE_COUNT = re.compile(r"[（(]\s*`?([\w./-]+\.\w+)`?\s*[，,]\s*约?\s*(\d+)\s*行\s*[）)]")
# [text](target) and ![alt](target); the target stops at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# <!-- code: model/model_lora.py --> right before a fenced block: the block quotes that file.
QUOTE = re.compile(r"<!-- code: ([\w./-]+) -->\s*\n```\w*\n(.*?)```", re.S)
LINE_TOLERANCE = 0.10


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    files += [p for p in (ROOT / "README.md", ROOT / "README_zh.md") if p.exists()]
    return files


def chapters() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if re.match(r"\d\d-", p.name))


@lru_cache(maxsize=None)
def defined_symbols(path: Path) -> frozenset:
    """Names a reader can look up in ``path``: top-level defs/classes/assignments and Class.member."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()

    def targets(node):
        if isinstance(node, ast.Assign):
            return [n for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target]
        return []

    def visit_top(body, top_level=True):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(f"{node.name}.{sub.name}")
                    for t in targets(sub):
                        names.add(f"{node.name}.{t.id}")
            elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` / `try: import ...`
                visit_top(node.body)
                for h in getattr(node, "handlers", []):
                    visit_top(h.body)
                visit_top(node.orelse)
            for t in targets(node):
                names.add(t.id)

    visit_top(tree.body)
    return frozenset(names)


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_chapters_exist_in_reading_order():
    names = [p.name for p in chapters()]
    numbers = [int(n[:2]) for n in names]
    assert numbers[:7] == list(range(7)), f"expected docs/00-*.md ... docs/06-*.md, found {names}"


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.name)
def test_chapter_opens_with_core_files(chapter):
    text = chapter.read_text(encoding="utf-8")
    m = re.search(r"^#+\s*核心文件\s*$(.*?)(?=^#)", text, re.S | re.M)
    assert m, f"{rel(chapter)}: no '核心文件' section"
    head = text[:m.start()]
    assert len(re.findall(r"^#+ ", head, re.M)) <= 1, f"{rel(chapter)}: '核心文件' must come right after the title"
    refs = SYMBOL_REF.findall(m.group(1))
    assert refs, f"{rel(chapter)}: the '核心文件' list cites no `path::Symbol`"
    counted = {p for p, _ in LINE_COUNT.findall(m.group(1))}
    missing = sorted({p for p, _ in refs} - counted)
    assert not missing, f"{rel(chapter)}: '核心文件' gives no line count for {missing}"


def test_symbol_references_resolve():
    problems, seen = [], 0
    for doc in doc_files():
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for path, symbol in SYMBOL_REF.findall(line):
                seen += 1
                where = f"{rel(doc)}:{lineno}: `{path}::{symbol}`"
                file = ROOT / path
                if not file.is_file():
                    problems.append(f"{where}: file {path} does not exist")
                elif symbol not in defined_symbols(file):
                    problems.append(f"{where}: {symbol} is not defined in {path}")
    assert seen, "no `path::Symbol` references found in the docs"
    assert not problems, "docs cite code that does not exist:\n  " + "\n  ".join(problems)


def test_stated_line_counts_match():
    problems, seen = [], 0
    for doc in doc_files():
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for path, n in LINE_COUNT.findall(line):
                seen += 1
                file = ROOT / path
                where = f"{rel(doc)}:{lineno}: ({path}, {n} lines)"
                if not file.is_file():
                    problems.append(f"{where}: file does not exist")
                    continue
                real = line_count(file)
                if abs(int(n) - real) > LINE_TOLERANCE * real:
                    problems.append(f"{where}: the file has {real} lines now (more than 10% off); update the doc")
    assert seen, "no line counts found in the docs"
    assert not problems, "stated line counts drifted:\n  " + "\n  ".join(problems)


def test_quoted_code_is_verbatim():
    problems, seen = [], 0
    for doc in doc_files():
        text = doc.read_text(encoding="utf-8")
        for m in QUOTE.finditer(text):
            seen += 1
            path = m.group(1)
            where = f"{rel(doc)}:{text[:m.start()].count(chr(10)) + 1}: quote of {path}"
            file = ROOT / path
            if not file.is_file():
                problems.append(f"{where}: file does not exist")
                continue
            source = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines()]
            pos = 0
            for line in m.group(2).splitlines():
                want = line.strip()
                if not want or want == "...":
                    continue
                try:
                    pos = source.index(want, pos) + 1
                except ValueError:
                    problems.append(f"{where}: line not found (in this order) in the file: {want!r}")
                    break
    assert seen, "no <!-- code: path --> quotes in the docs"
    assert not problems, "quoted code drifted from the source:\n  " + "\n  ".join(problems)


def test_local_links_and_images_exist():
    problems = []
    for doc in doc_files():
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, in-page anchors
            file = (doc.parent / target.split("#")[0]).resolve()
            if not file.exists():
                problems.append(f"{rel(doc)}: link to {target} (no such file)")
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_doc_number_tables_match_the_code():
    """Tables of parameter counts in the docs are exactly what dev/doc_numbers.py computes."""
    from conftest import dev_script
    from tools.doc_blocks import find_blocks

    doc_numbers = dev_script("doc_numbers")
    blocks = doc_numbers.render_blocks()
    found, problems = set(), []
    for doc in doc_files():
        for name, body in find_blocks(doc.read_text(encoding="utf-8"), doc_numbers.SOURCE, rel(doc)):
            found.add(name)
            if name not in blocks:
                problems.append(f"{rel(doc)}: unknown block doc_numbers:{name} (known: {sorted(blocks)})")
            elif body.strip() != blocks[name].strip():
                problems.append(f"{rel(doc)}: block doc_numbers:{name} differs from the code; "
                                f"run `python dev/doc_numbers.py --update`")
    assert found, "no <!-- doc_numbers:... --> blocks in the docs"
    assert not problems, "\n  ".join(problems)


# ----------------------------------------------------------------------------- committed results

RESULTS = DOCS / "results"


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every pipe table in ``text`` as (header cells, body rows); the |---| rule line is dropped."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and all(set(c) <= set("-: ") for c in block[1]):
            tables.append((block[0], block[2:]))
        block = []
    return tables


def eval_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The evaluation tables outside code blocks (a command's printed output may show one row): the
    first column is ``variant`` and one column is ``general QA``."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [(h, rows) for h, rows in markdown_tables(text) if h[0] == "variant" and "general QA" in h]


def committed_eval_report() -> tuple[list[str], list[list[str]], str]:
    text = (RESULTS / "eval_report.md").read_text(encoding="utf-8")
    tables = eval_tables(text)
    assert len(tables) == 1, "docs/results/eval_report.md should hold exactly one evaluation table"
    meta = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("|")]
    return tables[0][0], tables[0][1], meta[-1].strip()


@pytest.mark.parametrize("doc", ["docs/04-lora.md", "README.md"])
def test_printed_eval_tables_equal_the_committed_report(doc):
    """A table of scores in the LoRA chapter or the README is docs/results/eval_report.md, row for row.

    Columns are matched by name, so a table may show a subset of the report's columns (the README leaves
    out the held-out loss). Whatever run is committed under docs/results/, the printed numbers must be it.
    """
    header, rows, meta = committed_eval_report()
    text = (ROOT / doc).read_text(encoding="utf-8")
    printed = eval_tables(text)
    if doc.startswith("docs/"):
        assert printed, f"{doc}: no evaluation table (| variant | general QA | ...)"
        assert meta in text, f"{doc}: the report's machine / command / date line is not quoted: {meta!r}"
    for shown_header, shown_rows in printed:
        unknown = [c for c in shown_header if c not in header]
        assert not unknown, f"{doc}: columns {unknown} are not in docs/results/eval_report.md ({header})"
        cols = [header.index(c) for c in shown_header]
        want = [[row[i] for i in cols] for row in rows]
        assert shown_rows == want, (f"{doc}: the table {shown_header} differs from docs/results/eval_report.md;"
                                    f"\n  printed: {shown_rows}\n  report:  {want}")


def bench_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The performance tables outside code blocks: first column ``measurement``, one column ``status``."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [(h, rows) for h, rows in markdown_tables(text) if h[0] == "measurement" and "status" in h]


@pytest.mark.parametrize("doc", ["README.md", "docs/04-lora.md", "docs/05-inference-and-chat.md",
                                 "docs/06-evaluation.md"])
def test_printed_bench_tables_equal_the_committed_bench_json(doc):
    """Every performance table is rows of docs/results/bench.json as ``dev/bench.py --render`` prints
    them (a doc may quote some of the rows), and the doc quotes that run's machine, command and date."""
    from conftest import dev_script

    rendered = dev_script("bench").render_file(RESULTS / "bench.json")
    (header, rows), = bench_tables(rendered)
    meta = rendered.strip().splitlines()[-1]
    text = (ROOT / doc).read_text(encoding="utf-8")
    printed = bench_tables(text)
    assert printed, f"{doc}: no performance table (| measurement | ... | status |)"
    assert meta in text, f"{doc}: the bench run's machine / command / date line is not quoted: {meta!r}"
    for shown_header, shown_rows in printed:
        assert shown_header == header, f"{doc}: bench table header {shown_header} is not {header}"
        stale = [r for r in shown_rows if r not in rows]
        assert not stale, f"{doc}: rows not in docs/results/bench.json (python dev/bench.py --render " \
                          f"docs/results/bench.json prints the current ones): {stale}"

