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
- every number quoted inside a sentence with an inline marker ``<!-- n: FILE PATH FORMAT -->`` shows what
  dev/doc_numbers.py renders from docs/results/FILE (tools/doc_blocks.py), so prose cannot drift from a run;
- the evaluation tables in docs/04-lora.md, docs/06-evaluation.md and README.md equal the committed report
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
    assert numbers == list(range(len(numbers))) and len(numbers) >= 8, \
        f"expected docs/00-*.md, docs/01-*.md, ... without gaps (at least 00-07), found {names}"


def test_chapters_form_one_prev_next_chain():
    """Every chapter ends with links to the next and the previous one, derived from the numbered files
    present (so a new docs/08-*.md must join the chain); the last leads back to 00."""
    from conftest import dev_script

    doc_numbers = dev_script("doc_numbers")
    files = doc_numbers.chapter_files()
    assert [p.name for p in files] == [p.name for p in chapters()]
    problems = []
    for i, doc in enumerate(files):
        last = doc.read_text(encoding="utf-8").rstrip().splitlines()[-1]
        want = doc_numbers.chapter_footer(files, i)
        if last != want:
            problems.append(f"{rel(doc)}: ends with {last!r}, expected {want!r}")
        for k in (i - 1, i + 1):
            if 0 <= k < len(files):
                assert f"]({files[k].name})" in want
    assert not problems, "run `python dev/doc_numbers.py --update`:\n  " + "\n  ".join(problems)
    assert doc_numbers.update_footers(write=False) == [], "a chapter's footer is not the derived one"


def test_chapter_sections_are_numbered():
    """Every ## and ### heading of a chapter after the title and the '核心文件' list is numbered
    ("## 3. ..." / "### 3.1 ..."), so a section can be cited by its number."""
    problems = []
    for chapter in chapters():
        text = re.sub(r"```.*?```", "", chapter.read_text(encoding="utf-8"), flags=re.S)
        for line in text.splitlines():
            m = re.match(r"(#{2,3}) (.*)", line)
            if not m or m.group(2).strip() == "核心文件":
                continue
            pattern = r"\d+\. " if m.group(1) == "##" else r"\d+\.\d+(\.\d+)? "
            if not re.match(pattern, m.group(2)):
                problems.append(f"{rel(chapter)}: {line.strip()!r}")
    assert not problems, "unnumbered sections:\n  " + "\n  ".join(problems)


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


def test_readme_core_file_tables_state_current_line_counts():
    """The README's core-files table ("| `file` | lines | what |") within 10% of each file's length;
    `python dev/doc_numbers.py --line_counts` rewrites them."""
    from conftest import dev_script

    doc_numbers = dev_script("doc_numbers")
    assert doc_numbers.table_line_counts("| `trainer/a.py`, `b.py` | 10, 20 | x |") == [
        ("trainer/a.py", 10), ("trainer/b.py", 20)]
    problems, seen = [], 0
    for doc in (ROOT / "README.md", ROOT / "README_zh.md"):
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for path, n in doc_numbers.table_line_counts(line) or []:
                seen += 1
                real = line_count(ROOT / path) if (ROOT / path).is_file() else None
                if real is None or abs(n - real) > LINE_TOLERANCE * real:
                    problems.append(f"{doc.name}:{lineno}: {path} stated {n} lines, has {real}")
    assert seen, "no core-files table with line counts in the README"
    assert not problems, "run `python dev/doc_numbers.py --line_counts`:\n  " + "\n  ".join(problems)


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


def stale_blocks(source: str, blocks: dict[str, str], origin: str) -> tuple[set, list[str]]:
    """The names of ``source``'s generated blocks found in the docs, and those whose body is not ``blocks``'."""
    from tools.doc_blocks import find_blocks

    found, problems = set(), []
    for doc in doc_files():
        for name, body in find_blocks(doc.read_text(encoding="utf-8"), source, rel(doc)):
            found.add(name)
            if name not in blocks:
                problems.append(f"{rel(doc)}: unknown block {source}:{name} (known: {sorted(blocks)})")
            elif body.strip() != blocks[name].strip():
                problems.append(f"{rel(doc)}: block {source}:{name} differs from {origin}; "
                                f"run `python dev/doc_numbers.py --update`")
    return found, problems


def test_doc_number_tables_match_the_code():
    """Tables of parameter counts in the docs are exactly what dev/doc_numbers.py computes."""
    from conftest import dev_script

    doc_numbers = dev_script("doc_numbers")
    found, problems = stale_blocks(doc_numbers.SOURCE, doc_numbers.render_blocks(), "the code")
    assert found, "no <!-- doc_numbers:... --> blocks in the docs"
    assert not problems, "\n  ".join(problems)


def test_spread_tables_match_the_committed_report():
    """The README's three-seed tables are exactly what the committed spread report renders."""
    from conftest import dev_script

    doc_numbers = dev_script("doc_numbers")
    blocks = doc_numbers.spread_blocks()
    found, problems = stale_blocks(doc_numbers.SPREAD_SOURCE, blocks, "docs/results/spread_report.json")
    assert found == set(blocks), f"README blocks {sorted(found)}, report tables {sorted(blocks)}"
    assert not problems, "\n  ".join(problems)


def test_inline_figures_equal_their_result_files():
    """A number in a sentence, marked with the result file and key it comes from, is what that file holds."""
    from conftest import dev_script
    from tools.doc_blocks import find_figures

    doc_numbers = dev_script("doc_numbers")
    problems, seen, cache = [], 0, {}
    for doc in doc_numbers.figure_docs():
        for file, path, fmt, shown in find_figures(doc.read_text(encoding="utf-8")):
            seen += 1
            want = doc_numbers.figure_value(file, path, fmt, cache)
            if shown != want:
                problems.append(f"{rel(doc)}: {file} {path} shows {shown!r}, the file says {want!r}")
    assert seen >= 10, f"only {seen} inline figures (<!-- n: FILE PATH FORMAT -->) in the docs"
    assert not problems, ("numbers in the prose differ from their result files; run "
                          "`python dev/doc_numbers.py --update`:\n  " + "\n  ".join(problems))


def test_inline_figure_markers_are_checked(tmp_path):
    """The check above can fail: a wrong number, a missing key and an unclosed marker are all caught."""
    from conftest import dev_script
    from model.common import TinyMindError
    from tools.doc_blocks import fill_figures, find_figures

    doc_numbers = dev_script("doc_numbers")
    good = doc_numbers.figure_value("bench.json", "measurements/lora_step/rows/0/value", "{:.2f}x")
    text = "LoRA <!-- n: bench.json measurements/lora_step/rows/0/value {:.2f}x -->9.99x<!-- /n --> faster"
    (_, _, _, shown), = find_figures(text)
    assert shown == "9.99x" != good
    fixed, changed = fill_figures(text, doc_numbers.figure_value)
    assert changed and find_figures(fixed)[0][3] == good and fixed.endswith(" faster")
    with pytest.raises(TinyMindError, match="no 'nope'"):
        doc_numbers.figure_value("bench.json", "measurements/nope", "{}")
    with pytest.raises(TinyMindError, match="not a JSON file"):
        doc_numbers.figure_value("../../README.md", "x", "{}")
    assert doc_numbers.figure_value("eval_report.json", "summary/variant=SFT/variant", "{}") == "SFT"


def test_no_stray_figure_markers():
    """Every inline opening marker has its closing one on the same line (else it would not be checked)."""
    problems = []
    for doc in doc_files():
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.count("<!-- n: ") != line.count("<!-- /n -->"):
                problems.append(f"{rel(doc)}:{lineno}")
    assert not problems, "inline figure markers not closed on their line:\n  " + "\n  ".join(problems)


# A command's flags that only say where files are, which device runs it, or ask for help.
LOCATION_FLAGS = {"--save_dir", "--device", "--from_resume", "--help", "--dtype", "--watch_prompts"}
# the demo's own files: what each training script writes by default, and the adapters' recipe stages
DEMO_OUTPUT = {"trainer/train_pretrain.py": ("--weight", "pretrain", "pretrain"),
               "trainer/train_sft.py": ("--weight", "full_sft", "sft"),
               "trainer/train_lora.py": ("--lora_name", "lora_identity", None)}


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python trainer/train_*.py ...` in the docs: lines of code blocks (with
    backslash continuations joined) and commands written inline in backticks."""
    found = []
    for doc in doc_files():
        text = doc.read_text(encoding="utf-8")
        blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", text, re.S | re.M)
        lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
        inline = re.findall(r"`(python [^`]+)`", re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M))
        for cmd in lines + inline:
            cmd = cmd.split("#")[0].strip()
            if re.match(r"(python|torchrun .*?) trainer/train_(pretrain|sft|lora)\.py", cmd):
                found.append((rel(doc), cmd))
    return found


def demo_overwrite(cmd: str) -> str | None:
    """Why training command ``cmd`` would overwrite one of the demo's files with other settings than
    that stage's recipe (tools/recipes.py), or None ("" for a command that writes no demo file)."""
    from tools.recipes import STAGES

    words = cmd.split()
    script = next(w for w in words if w.startswith("trainer/train_"))
    flag, default, stage = DEMO_OUTPUT[script]
    args = words[words.index(script) + 1:]
    pairs = {w: (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "")
             for i, w in enumerate(args) if w.startswith("--")}
    if "--help" in pairs or pairs.get("--preset", "tiny") != "tiny" or pairs.get("--hidden_size", "192") != "192":
        return ""   # prints help, or writes another size's file
    name = pairs.get(flag, default)
    if stage is None:
        stage = name if name in ("lora_identity", "lora_medical") else None
    elif name != default:
        stage = None
    if stage is None:
        return ""
    recipe = STAGES["tiny"][stage]
    want = dict(zip(recipe[::2], recipe[1::2]))
    got = {k: v for k, v in pairs.items() if k not in LOCATION_FLAGS and k != flag}
    data = {"lora_identity": "dataset/lora_identity.jsonl", "lora_medical": "dataset/lora_medical.jsonl"}
    if stage in data:   # its own data file is the recipe's, said or not
        if got.get("--data_path") == data[stage]:
            del got["--data_path"]
        want.pop("--data_path", None)
    if got == want:
        return None
    return f"`{cmd}` writes the demo's {name} with other settings than its recipe {want}; give it a {flag} of its own"


def test_doc_commands_never_overwrite_the_demo_files():
    """A training command in the docs writes the demo's own file (out/pretrain_192.pth, full_sft_192.pth,
    lora_identity_192.pth, lora_medical_192.pth) only when it is that stage's recipe (tools/recipes.py);
    an experiment, a variant or an exercise writes under a name of its own."""
    commands = doc_commands()
    assert len(commands) >= 20, f"only {len(commands)} training commands found in the docs"
    problems = [f"{where}: {why}" for where, cmd in commands if (why := demo_overwrite(cmd))]
    assert not problems, "\n  ".join(problems)


def test_demo_overwrite_check_catches_an_experiment_under_the_demo_name():
    assert demo_overwrite("python trainer/train_lora.py --lora_variant qlora --qlora_double_quant 1")
    assert demo_overwrite("python trainer/train_lora.py --lora_name lora_medical --data_path dataset/lora_medical.jsonl "
                          "--epochs 9 --learning_rate 5e-3")
    assert demo_overwrite("python trainer/train_pretrain.py --max_steps 30")
    assert demo_overwrite("python trainer/train_lora.py --lora_name lora_identity --data_path dataset/lora_identity.jsonl "
                          "--epochs 8") is None
    assert demo_overwrite("python trainer/train_lora.py --lora_name lora_identity --epochs 4")
    assert demo_overwrite("python trainer/train_lora.py --lora_variant qlora --lora_name id_qlora") == ""
    assert demo_overwrite("python trainer/train_sft.py --preset small --learning_rate 5e-5") == ""


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


@pytest.mark.parametrize("doc", ["docs/04-lora.md", "docs/06-evaluation.md", "README.md"])
def test_printed_eval_tables_equal_the_committed_report(doc):
    """A table of scores in the LoRA chapter or the README is docs/results/eval_report.md, row for row.

    Columns are matched by name, so a table may show a subset of the report's columns (the README leaves
    out the held-out loss). Whatever run is committed under docs/results/, the printed numbers must be it.
    """
    header, rows, meta = committed_eval_report()
    text = (ROOT / doc).read_text(encoding="utf-8")
    # the spread report's tables (min–max over seeds) are checked against spread_report.json instead
    text = re.sub(r"<!-- spread:(\w+) -->.*?<!-- /spread:\1 -->", "", text, flags=re.S)
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


@pytest.mark.parametrize("doc, result", [(d, "bench.json") for d in (
    "README.md", "README_zh.md", "docs/04-lora.md", "docs/05-inference-and-chat.md", "docs/06-evaluation.md")]
    + [("docs/08-lora-on-real-models.md", "bench_lora_135m.json")])
def test_printed_bench_tables_equal_the_committed_bench_json(doc, result):
    """Every performance table is rows of its committed bench run (docs/results/bench.json, or chapter 08's
    bench_lora_135m.json) as ``dev/bench.py --render`` prints them (a doc may quote some of the rows), and
    the doc quotes that run's machine, command and date."""
    from conftest import dev_script

    rendered = dev_script("bench").render_file(RESULTS / result)
    (header, rows), = bench_tables(rendered)
    meta = rendered.strip().splitlines()[-1]
    text = (ROOT / doc).read_text(encoding="utf-8")
    printed = bench_tables(text)
    assert printed, f"{doc}: no performance table (| measurement | ... | status |)"
    assert meta in text, f"{doc}: the bench run's machine / command / date line is not quoted: {meta!r}"
    for shown_header, shown_rows in printed:
        assert shown_header == header, f"{doc}: bench table header {shown_header} is not {header}"
        stale = [r for r in shown_rows if r not in rows]
        assert not stale, f"{doc}: rows not in docs/results/{result} (python dev/bench.py --render " \
                          f"docs/results/{result} prints the current ones): {stale}"

