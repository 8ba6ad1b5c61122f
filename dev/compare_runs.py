"""Put several pipeline runs side by side: the scores of each run and their spread (e.g. two seeds).

Reads ``{save_dir}/pipeline_report.json`` (written by scripts/run_pipeline.py) of every folder given and
prints one markdown table: for each variant (SFT, +identity, +medical, +both) and score, every run's
value, then the mean and the spread (max - min, in percentage points); below it, the wall time of
each stage per run. How much a score moves between seeds says how much a difference between two
recipes has to exceed before it means anything.

    python scripts/run_pipeline.py --force --seed 42 --save_dir out/seed42
    python scripts/run_pipeline.py --force --seed 1 --save_dir out/seed1
    python dev/compare_runs.py out/seed42 out/seed1                 # prints the table
    python dev/compare_runs.py out/seed42 out/seed1 --out out/seeds.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from model.common import TinyMindError, atomic_write_text, repo_path, run_main

SCORES = (("general_qa", "general QA"), ("identity_new", "identity: new persona"),
          ("identity_base", "identity: base persona"), ("medical_qa", "medical QA"))


def load_report(folder: Path) -> dict:
    path = folder / "pipeline_report.json"
    if not path.is_file():
        raise TinyMindError(f"{path} not found: run python scripts/run_pipeline.py --save_dir {folder} first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TinyMindError(f"{path} is not valid JSON ({e.msg})") from None
    if "eval" not in report:
        raise TinyMindError(f"{path} has no evaluation (the run skipped the eval stage)")
    return report


def score_table(reports: list[dict], names: list[str]) -> list[str]:
    """One row per (variant, score) with a cell per run, the mean and the spread in points."""
    lines = ["| variant | score | " + " | ".join(names) + " | mean | spread |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |"]
    variants = [row["variant"] for row in reports[0]["eval"]]
    for variant in variants:
        rows = [next((r for r in rep["eval"] if r["variant"] == variant), None) for rep in reports]
        for key, label in SCORES:
            values = [None if r is None else r.get(key) for r in rows]
            if all(v is None for v in values):
                continue
            known = [100 * v for v in values if v is not None]
            cells = ["—" if v is None else f"{100 * v:.1f}%" for v in values]
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) +
                         f" | {sum(known) / len(known):.1f}% | {max(known) - min(known):.1f} |")
    return lines


def time_table(reports: list[dict], names: list[str]) -> list[str]:
    stages = list(dict.fromkeys(s for rep in reports for s in rep["stage_seconds"]))
    lines = ["| stage | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
    for stage in stages + ["total"]:
        cells = []
        for rep in reports:
            t = rep["total_seconds"] if stage == "total" else rep["stage_seconds"].get(stage)
            cells.append("skipped" if t is None else f"{t:.0f} s")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def build_parser():
    p = argparse.ArgumentParser(description="Compare pipeline runs (e.g. two seeds): scores, spread, stage times.")
    p.add_argument("save_dirs", nargs="+", help="folders holding a pipeline_report.json each")
    p.add_argument("--out", default="", help="also write the tables to this markdown file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    folders = [repo_path(d) for d in args.save_dirs]
    reports = [load_report(f) for f in folders]
    names = [f.name for f in folders]
    lines = score_table(reports, names) + [""] + time_table(reports, names) + [""]
    lines += [f"- {n}: `{r['command']}`, {r['machine']}, {r['date']}" for n, r in zip(names, reports)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write_text(repo_path(args.out), text)
    return text


if __name__ == "__main__":
    run_main(main)
