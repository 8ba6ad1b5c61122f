"""The demo chain over several seeds in one report: the spread of every score, the targets, chat examples.

One run of scripts/run_pipeline.py is one sample. The seed sets the model's initialisation, the data
order, the validation split and each LoRA's init, and on the `tiny` preset that alone has moved the
medical adapter from 13% to 60%. ``python scripts/run_pipeline.py --seeds 42,1,2`` trains the chain once
per seed into ``{save_dir}/seed{N}/`` and then writes ``{save_dir}/spread_report.md`` and ``.json`` from
what those folders hold (their eval_report.json and pipeline_report.json):

- ``SCORES`` / ``TARGETS``: the report's columns, and the demo's targets (the one place their numbers live);
- ``parse_seeds`` / ``seed_dir``: the ``--seeds`` flag and the folder of one seed;
- ``load_seed_run``: one seed's scores per variant, its pipeline wall time and the stages it skipped;
- ``spread``: min / median / max of every score over the seeds; ``check_targets``: each target judged on
  the worst seed (a drop of general QA is taken within each seed, then the worst one);
- ``chat_examples``: each variant's greedy reply to ``CHAT_PROMPTS``, the model loaded and switched the
  way the evaluation does it (``tools/scoring.py::each_variant``);
- ``render_markdown`` / ``write_spread_report``: the report files, with the machine, command and date.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.common import TinyMindError, atomic_write_text, setup_device
from model.engine import encode_chat, greedy_replies, load_base
from model.tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer
from tools.measure import cpu_info
from tools.recipes import ORDER
from tools.scoring import COMPARE, compare_variants, each_variant

VARIANTS = tuple(label for label, _ in COMPARE)
# (key, column name, unit): scores are fractions in eval_report.json and percentages in the report.
SCORES = (("general_qa", "general QA", "%"), ("identity_new", "new persona", "%"),
          ("identity_base", "base persona", "%"), ("medical_qa", "medical QA", "%"),
          ("medical_department", "medical departments", "%"), ("medical_symptom", "medical symptoms", "%"),
          ("heldout_loss", "held-out loss", ""))
MEDICAL_KINDS = ("medical_department", "medical_symptom")   # the `kind`s of dataset/eval/medical_qa.jsonl


@dataclass(frozen=True)
class Target:
    """``variant``'s ``measure`` compared with ``limit`` by ``op`` (">=" or "<=").

    measure: a ``SCORES`` key (in %), "general_drop" (the SFT row's general QA minus this variant's, in
    points, within one seed) or "seconds" (a seed's pipeline wall time; only full runs count). A target holds
    when every seed meets it, so ">=" is judged on the lowest seed and "<=" on the highest; ``over_seeds``
    judges max - min over the seeds instead (how far apart the seeds are)."""
    variant: str
    measure: str
    op: str
    limit: float
    over_seeds: bool = False


TARGETS = (
    Target("SFT", "general_qa", ">=", 75.0),
    Target("SFT", "identity_base", ">=", 95.0),
    Target("SFT", "medical_qa", "<=", 10.0),
    Target("+identity", "identity_new", ">=", 95.0),
    Target("+identity", "general_drop", "<=", 3.0),
    Target("+medical", "medical_qa", ">=", 75.0),
    Target("+medical", "medical_department", ">=", 90.0),
    Target("+medical", "medical_symptom", ">=", 50.0),
    Target("+medical", "general_drop", "<=", 5.0),
    Target("+both", "identity_new", ">=", 90.0),
    Target("+both", "medical_qa", ">=", 65.0),
    Target("+both", "general_drop", "<=", 8.0),
    Target("+medical", "medical_qa", "<=", 10.0, over_seeds=True),
    Target("pipeline", "seconds", "<=", 15 * 60.0),
)

# What the chat examples ask each variant: the persona, two departments (感冒 is in lora_medical's table,
# 中耳炎 a one-token condition name), and a fact the SFT data teaches, in a phrasing of the general QA set.
CHAT_PROMPTS = ("你是谁？", "感冒应该挂什么科？", "中耳炎应该挂什么科？", "请问唐书瑶的职业是什么？")
CHAT_TOKENS = 48   # the evaluation's reply cap (scripts/evaluate.py --max_new_tokens)


# ----------------------------------------------------------------------------- seeds and their runs

def parse_seeds(text: str) -> list[int]:
    """``"42,1,2"`` -> [42, 1, 2]. A value that is not a non-negative integer, a repeated seed or no seed at
    all is a TinyMindError naming the flag."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.isdigit():   # digits only: no sign, no decimal point
            raise TinyMindError(f"--seeds {text}: {part!r} is not a non-negative integer (e.g. --seeds 42,1,2)")
        if int(part) in seeds:
            raise TinyMindError(f"--seeds {text}: seed {int(part)} is given twice")
        seeds.append(int(part))
    if not seeds:
        raise TinyMindError(f"--seeds {text!r}: no seed given (e.g. --seeds 42,1,2)")
    return seeds


def seed_dir(save_dir, seed: int) -> Path:
    """The folder of one seed of a ``--seeds`` run: ``{save_dir}/seed{N}``."""
    return Path(save_dir) / f"seed{seed}"


@dataclass
class SeedRun:
    seed: int
    folder: Path
    scores: dict[str, dict[str, float | None]]   # variant -> SCORES key -> value (None: not measured)
    total_seconds: float | None                  # the pipeline's wall time
    skipped: list[str]                           # stages that did not run (their files existed): not a full run

    @property
    def full_run(self) -> bool:
        return not self.skipped


def read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise TinyMindError(f"{path} not found: {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TinyMindError(f"{path} is not valid JSON ({e.msg})") from None


def load_seed_run(seed: int, folder: Path) -> SeedRun:
    """The numbers of one seed's folder: every variant's scores from eval_report.json (the medical kinds from
    the summary row, or the full results of a report written before the row had them), and the wall time
    and skipped stages from pipeline_report.json."""
    hint = f"run python scripts/run_pipeline.py --seed {seed} --save_dir {folder}"
    report = read_json(folder / "eval_report.json", hint)
    pipeline = read_json(folder / "pipeline_report.json", hint)
    if "summary" not in report:
        raise TinyMindError(f"{folder / 'eval_report.json'} has no 'summary': not written by scripts/evaluate.py")
    scores = {}
    for row in report["summary"]:
        label = row["variant"]
        kinds = row.get("medical_qa_by_kind")
        if kinds is None:
            kinds = report.get("results", {}).get(label, {}).get("medical_qa", {}).get("by_kind", {})
        values = {key: row.get(key) for key, _, _ in SCORES if key not in MEDICAL_KINDS}
        values.update({kind: kinds.get(kind, {}).get("accuracy") for kind in MEDICAL_KINDS})
        scores[label] = values
    seconds = pipeline.get("stage_seconds", {})
    skipped = [s for s in ORDER if seconds.get(s) is None]   # None: skipped; absent: not among --stages
    return SeedRun(seed, folder, scores, pipeline.get("total_seconds"), skipped)


# ----------------------------------------------------------------------------- numbers

def score(run: SeedRun, variant: str, key: str) -> float | None:
    """A score of one seed in report units: percent for accuracies, the loss as it is."""
    value = run.scores.get(variant, {}).get(key)
    unit = next(u for k, _, u in SCORES if k == key)
    return None if value is None else (100 * value if unit == "%" else value)


def spread(runs: list[SeedRun]) -> dict[str, dict[str, dict | None]]:
    """variant -> SCORES key -> {"min", "median", "max", "n"} over the seeds that measured it (None: none did)."""
    table = {}
    for variant in VARIANTS:
        row = {}
        for key, _, _ in SCORES:
            values = [v for v in (score(r, variant, key) for r in runs) if v is not None]
            row[key] = None if not values else {"min": min(values), "median": statistics.median(values),
                                                "max": max(values), "n": len(values)}
        if any(row.values()):
            table[variant] = row
    return table


def seed_value(run: SeedRun, t: Target) -> float | None:
    """What ``t`` measures on one seed (None: not measured, or a wall time that is not a full run's)."""
    if t.measure == "seconds":
        return run.total_seconds if run.full_run else None
    if t.measure == "general_drop":
        base, here = score(run, "SFT", "general_qa"), score(run, t.variant, "general_qa")
        return None if base is None or here is None else base - here
    return score(run, t.variant, t.measure)


def target_label(t: Target) -> str:
    op = {">=": "≥", "<=": "≤"}[t.op]
    if t.measure == "seconds":
        return f"pipeline wall time per seed {op} {t.limit:.0f} s ({t.limit / 60:g} min)"
    if t.measure == "general_drop":
        return f"{t.variant}: general QA drop from SFT {op} {t.limit:g} points"
    name = next(n for k, n, _ in SCORES if k == t.measure)
    if t.over_seeds:
        return f"{t.variant}: {name} max − min over the seeds {op} {t.limit:g} points"
    return f"{t.variant}: {name} {op} {t.limit:g}%"


def check_targets(runs: list[SeedRun], targets=TARGETS) -> list[dict]:
    """Every target with each seed's value, the judged value and PASS / MISS ("—" where no seed measured it,
    or fewer than two seeds a spread).
    Values are compared rounded to 1e-6, so a drop of 80% - 77% is exactly 3 points, not 3.0000000000000027."""
    checks = []
    for t in targets:
        per_seed = {r.seed: seed_value(r, t) for r in runs}
        known = {s: v for s, v in per_seed.items() if v is not None}
        worst = None
        if not known or (t.over_seeds and len(known) < 2):   # a spread needs two seeds
            value = None
        elif t.over_seeds:
            value = max(known.values()) - min(known.values())
        else:
            worst = (min if t.op == ">=" else max)(known, key=known.get)
            value = known[worst]
        if value is None:
            status = "—"
        else:
            ok = round(value, 6) >= t.limit if t.op == ">=" else round(value, 6) <= t.limit
            status = "PASS" if ok else "MISS"
        checks.append({"target": target_label(t), "variant": t.variant, "measure": t.measure, "op": t.op,
                       "limit": t.limit, "over_seeds": t.over_seeds, "per_seed": per_seed, "value": value,
                       "worst_seed": worst, "status": status})
    return checks


# ----------------------------------------------------------------------------- chat examples

def chat_examples(save_dir, hidden_size: int | None = None, device="cpu", prompts=CHAT_PROMPTS,
                  max_new_tokens: int = CHAT_TOKENS, tokenizer_path=DEFAULT_TOKENIZER_PATH) -> dict[str, list[str]]:
    """variant label -> the greedy (temperature 0) reply to each of ``prompts``, for every variant of
    ``COMPARE`` whose LoRA files ``save_dir`` holds; ``{save_dir}/full_sft_{hidden}.pth`` is the base."""
    model, _, _ = load_base(save_dir, "full_sft", hidden_size, device=device)
    tok = load_tokenizer(tokenizer_path)
    ids = [encode_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
    variants = compare_variants(save_dir, model.config.hidden_size)
    return {label: greedy_replies(model, tok, ids, max_new_tokens)
            for label, _ in each_variant(model, save_dir, variants)}


# ----------------------------------------------------------------------------- the report

def machine_info(device) -> dict:
    cpu = cpu_info()
    return {**cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "python": platform.python_version(), "system": f"{platform.machine()} {platform.system()}"}


def value_cell(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}%" if unit == "%" else f"{v:.3f}"


def spread_cell(s: dict | None, unit: str, seeds: int) -> str:
    if s is None:
        return "—"
    fmt = "{:.1f}" if unit == "%" else "{:.3f}"
    cell = " / ".join(fmt.format(s[k]) for k in ("min", "median", "max")) + unit
    return cell if s["n"] == seeds else f"{cell} ({s['n']} of {seeds} seeds)"


def measured_cell(c: dict, runs: list[SeedRun]) -> str:
    """The judged value of a target and the seed it comes from."""
    if c["measure"] == "seconds":
        times = ", ".join(f"seed {r.seed} {r.total_seconds:.0f} s" if r.full_run and r.total_seconds is not None
                          else f"seed {r.seed} not a full run" for r in runs)
        return times if c["value"] is None else f"max {c['value']:.0f} s ({times})"
    if c["value"] is None:
        return "—"
    if c["over_seeds"]:
        known = [v for v in c["per_seed"].values() if v is not None]
        return f"{c['value']:.1f} points ({min(known):.1f}% to {max(known):.1f}%)"
    if c["measure"] == "general_drop":
        return f"worst {c['value']:+.1f} points (seed {c['worst_seed']})"
    return f"{'min' if c['op'] == '>=' else 'max'} {c['value']:.1f}% (seed {c['worst_seed']})"


def md_cell(text: str) -> str:
    """A reply as one table cell: no line breaks, no column separators."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def render_markdown(report: dict, runs: list[SeedRun]) -> str:
    seeds = report["seeds"]
    n = len(seeds)
    lines = [f"# TinyMind over {n} seeds ({report['preset']}): {', '.join(map(str, seeds))}", "",
             f"Each cell: min / median / max over the seeds, folders `{report['save_dir']}/seed{{N}}/`.", "",
             "| variant (min / median / max) | " + " | ".join(name for _, name, _ in SCORES) + " |",
             "| --- |" + " --- |" * len(SCORES)]
    for variant, row in report["spread"].items():
        cells = [spread_cell(row[key], unit, n) for key, _, unit in SCORES]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")

    checks = report["targets"]
    met = sum(c["status"] == "PASS" for c in checks)
    lines += ["", "## Targets", "",
              "A target holds when every seed meets it: ≥ is judged on the lowest seed, ≤ on the highest; a drop "
              "of general QA is SFT minus the variant within one seed.", "",
              "| target | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {measured_cell(c, runs)} | {c['status']} |" for c in checks]
    lines += ["", f"{met} of {len(checks)} targets met."]

    lines += ["", "## Each seed", "",
              "| seed | variant | " + " | ".join(name for _, name, _ in SCORES) + " |",
              "| --- | --- |" + " --- |" * len(SCORES)]
    for r in runs:
        for variant in report["spread"]:
            if variant in r.scores:
                cells = [value_cell(score(r, variant, key), unit) for key, _, unit in SCORES]
                lines.append(f"| {r.seed} | {variant} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | pipeline wall time | note |", "| --- | --- | --- |"]
    for r in runs:
        total = "—" if r.total_seconds is None else f"{r.total_seconds:.1f} s"
        note = (f"{', '.join(r.skipped)} skipped (files existed or not among --stages): not a full run"
                if r.skipped else "full run")
        lines.append(f"| {r.seed} | {total} | {note} |")

    if report.get("chat"):
        lines += ["", "## Chat examples", "",
                  f"Greedy replies (temperature 0, at most {CHAT_TOKENS} tokens) of each variant."]
        for seed, replies in report["chat"].items():
            labels = list(replies)
            lines += ["", f"### seed {seed}", "", "| prompt | " + " | ".join(labels) + " |",
                      "| --- |" + " --- |" * len(labels)]
            for k, prompt in enumerate(report["chat_prompts"]):
                lines.append(f"| {prompt} | " + " | ".join(md_cell(replies[v][k]) for v in labels) + " |")

    m = report["machine"]
    bf16 = f"native bf16 ({', '.join(m['bf16_flags'])})" if m["native_bf16"] else "no native bf16"
    lines += ["", f"Machine: {m['cpu']}, {bf16}, {m['system']}, torch {m['torch']}, {m['threads']} threads, "
                  f"{m['device']}. Command: `{report['command']}`. Date: {report['date']}."]
    return "\n".join(lines) + "\n"


def write_spread_report(save_dir: Path, seeds: list[int], hidden_size: int | None = None, device="cpu",
                        command: str = "", preset: str = "", chat: bool = True) -> dict:
    """Read ``{save_dir}/seed{N}/`` of every seed, ask each seed's variants ``CHAT_PROMPTS`` (``chat``), and
    write ``{save_dir}/spread_report.md`` and ``.json``. Returns the report, its markdown under "markdown"."""
    save_dir = Path(save_dir)
    runs = [load_seed_run(s, seed_dir(save_dir, s)) for s in seeds]
    dev = setup_device(device, "float32", log=False, inference=True).device   # fp32, as the evaluation
    report = {"seeds": seeds, "preset": preset, "save_dir": str(save_dir), "spread": spread(runs),
              "targets": check_targets(runs),
              "per_seed": {r.seed: {"folder": str(r.folder), "scores": r.scores, "total_seconds": r.total_seconds,
                                    "skipped": r.skipped} for r in runs},
              "chat_prompts": list(CHAT_PROMPTS),
              "chat": {r.seed: chat_examples(r.folder, hidden_size, dev) for r in runs} if chat else {},
              "machine": machine_info(dev), "command": command, "date": time.strftime("%Y-%m-%d %H:%M")}
    text = render_markdown(report, runs)
    atomic_write_text(save_dir / "spread_report.json", json.dumps(report, ensure_ascii=False, indent=1))
    atomic_write_text(save_dir / "spread_report.md", text)
    return {**report, "markdown": text}


# ----------------------------------------------------------------------------- tables for the README

# (prompt index in CHAT_PROMPTS, variant) pairs the README shows per seed: each prompt with the variants
# whose answer it tests.
DOC_CHAT = ((0, "+identity"), (0, "+both"), (1, "+medical"), (1, "+both"), (2, "+medical"), (2, "+both"),
            (3, "SFT"), (3, "+both"))
DOC_SCORES = ("general_qa", "identity_new", "identity_base", "medical_qa", "medical_department", "medical_symptom")


def doc_tables(report: dict) -> dict[str, str]:
    """The README's tables of a spread report (as read back from spread_report.json): "spread" (min–max of
    every score per variant), "targets" (each target with every seed's value and its status) and "chat"
    (the replies to the chat prompts, a column per seed). dev/doc_numbers.py writes them into the docs'
    ``<!-- spread:NAME -->`` blocks and tests/test_docs.py checks them against the committed report."""
    names = {k: n for k, n, _ in SCORES}
    seeds = [str(s) for s in report["seeds"]]
    rows = ["| variant | " + " | ".join(names[k] for k in DOC_SCORES) + " |",
            "| --- |" + " --- |" * len(DOC_SCORES)]
    for variant, row in report["spread"].items():
        cells = ["—" if row.get(k) is None else
                 (f"{row[k]['min']:.1f}%" if abs(row[k]["max"] - row[k]["min"]) < 0.05
                  else f"{row[k]['min']:.1f}–{row[k]['max']:.1f}%") for k in DOC_SCORES]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    spread_table = "\n".join(rows)

    def per_seed(c: dict) -> str:
        unit = {"seconds": " s", "general_drop": " points"}.get(c["measure"], "%")
        fmt = "{:.0f}" if c["measure"] == "seconds" else "{:.1f}"
        values = [c["per_seed"].get(s) for s in seeds]
        text = " / ".join("—" if v is None else fmt.format(v) for v in values) + unit
        if c["over_seeds"] and c["value"] is not None:
            text = f"{c['value']:.1f} points"
        return text

    rows = ["| target | seeds " + " / ".join(seeds) + " | |", "| --- | --- | --- |"]
    rows += [f"| {c['target']} | {per_seed(c)} | {c['status']} |" for c in report["targets"]]
    targets_table = "\n".join(rows)

    rows = ["| prompt | variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "| --- | --- |" + " --- |" * len(seeds)]
    for k, variant in DOC_CHAT:
        replies = [report["chat"].get(s, {}).get(variant) for s in seeds]
        if any(r is None for r in replies):
            continue
        rows.append(f"| {report['chat_prompts'][k]} | {variant} | " + " | ".join(md_cell(r[k]) for r in replies) + " |")
    return {"spread": spread_table, "targets": targets_table, "chat": "\n".join(rows)}
