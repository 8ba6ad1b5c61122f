"""The whole TinyMind chain in one command: pretrain -> SFT -> lora_identity -> lora_medical -> evaluation.

Each stage is the ordinary script a learner would run by hand (trainer/train_pretrain.py, ...), started
as a subprocess, with the file names (and --seed, --device, --save_dir when given) and the flags of the
preset's recipe, tools/recipes.py::STAGES: for `tiny`, Muon for pretraining and the medical adapter's own
recipe; the SFT and identity stages run on the scripts' defaults (`python trainer/train_sft.py` alone
trains the same model as the pipeline's SFT stage). The command line of every stage is printed. A
training stage whose output file already exists is skipped, unless a stage before it was retrained
(``--force`` reruns everything); a stage that was interrupted left a resume file, and the next run
continues it with ``--from_resume 1``. The evaluation always runs.

    python scripts/run_pipeline.py                      # the CPU demo (`tiny` preset)
    python scripts/run_pipeline.py --preset smoke       # a 2-minute end-to-end check
    python scripts/run_pipeline.py --device cuda        # the same on a GPU
    python scripts/run_pipeline.py --force              # retrain every stage
    python scripts/run_pipeline.py --seed 1 --save_dir out/seed1   # another seed (init, data order, split)
    python scripts/run_pipeline.py --seeds 42,1,2       # the chain once per seed, and the spread report
    python scripts/run_pipeline.py --retrain_tokenizer  # also retrain model/tokenizer.json first

At the end it prints the evaluation table (SFT alone, +identity, +medical, +both) and writes
{save_dir}/pipeline_report.md and .json, {save_dir}/eval_report.* and {save_dir}/eval_chart.png.

One run is one sample: the seed alone moves the medical adapter's score a lot (docs/06-evaluation.md,
section 3.1). ``--seeds 42,1,2`` runs the chain once per seed, each exactly as
``--seed N --save_dir {save_dir}/seed{N}`` would (so a seed whose files exist is skipped stage by stage,
and ``--force`` retrains it), then writes {save_dir}/spread_report.md and .json (tools/spread.py):
min / median / max of every score over the seeds, each seed's numbers and wall time, the demo's targets
judged on the worst seed, and every variant's greedy replies to a few chat prompts per seed. A seed that
fails stops the run with one line naming the seed and its log.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from model.common import ROOT, TinyMindError, atomic_write_text, repo_path, run_main, safe_load
from model.model import get_config
from tools.recipes import ORDER, STAGES
from tools.spread import parse_seeds, seed_dir, write_spread_report


def stage_command(stage: str, recipe: list[str], args, hidden: int) -> tuple[list[str], Path | None]:
    """The command line of one stage and the file whose existence marks it done."""
    common = ["--save_dir", str(args.save_dir), "--device", args.device]
    if stage != "pretrain":   # several presets may share a save_dir: name the size explicitly
        common += ["--hidden_size", str(hidden)]
    if args.seed is not None and stage != "eval":
        common += ["--seed", str(args.seed)]
    if stage == "pretrain":
        return (["trainer/train_pretrain.py", "--weight", "pretrain", "--data_path", "dataset/pretrain_demo.jsonl",
                 "--preset", args.preset] + common + recipe, args.save_dir / f"pretrain_{hidden}.pth")
    if stage == "sft":
        return (["trainer/train_sft.py", "--from_weight", "pretrain", "--weight", "full_sft",
                 "--data_path", "dataset/sft_demo.jsonl"] + common + recipe, args.save_dir / f"full_sft_{hidden}.pth")
    if stage.startswith("lora_"):
        return (["trainer/train_lora.py", "--from_weight", "full_sft", "--lora_name", stage,
                 "--data_path", f"dataset/{stage}.jsonl"] + common + recipe, args.save_dir / f"{stage}_{hidden}.pth")
    return (["scripts/evaluate.py", "--weight", "full_sft", "--compare", "1"] + common + recipe, None)


def unfinished_resume(done: Path) -> Path | None:
    """The stage's resume file if it records an unfinished run (weights are also saved mid-run)."""
    resume = done.with_name(done.stem + "_resume.pth")
    if not resume.exists():
        return None
    return None if safe_load(resume, "resume file").get("finished", False) else resume


def preset_hidden(preset: str) -> int:
    return get_config(preset).hidden_size


def run_stage(cmd: list[str], log_path: Path) -> float:
    """Run one stage, echo its output and keep a log; a failed stage stops the pipeline."""
    t0 = time.time()
    lines = []
    proc = subprocess.Popen([sys.executable, "-u"] + cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    for line in proc.stdout:
        print("    " + line, end="", flush=True)
        lines.append(line)
    code = proc.wait()
    atomic_write_text(log_path, "".join(lines))  # the console showed it live; the file is whole or absent
    if code != 0:
        raise TinyMindError(f"stage `python {' '.join(cmd)}` failed with exit status {code}; log: {log_path}")
    return time.time() - t0


def build_parser():
    p = argparse.ArgumentParser(description="Run pretrain -> SFT -> two LoRAs -> evaluation on the shipped demo data.")
    p.add_argument("--preset", default="tiny", choices=sorted(STAGES), help="model size and training recipe")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (passed to every stage)")
    p.add_argument("--save_dir", default="out", help="where checkpoints, logs and reports go")
    p.add_argument("--force", action="store_true", help="rerun stages whose output already exists")
    p.add_argument("--stages", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    p.add_argument("--seed", type=int, default=None,
                   help="passed to every training stage (model init, data order, validation split, LoRA init); "
                        "default: the scripts' own (42)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, e.g. 42,1,2: the chain once per seed into {save_dir}/seed{N}/ "
                        "(as --seed N --save_dir {save_dir}/seed{N}), then {save_dir}/spread_report.md/.json: "
                        "min / median / max of every score, the targets on the worst seed, chat examples")
    p.add_argument("--retrain_tokenizer", action="store_true",
                   help="first retrain model/tokenizer.json on the shipped training files (the shipped one is "
                        "already trained on them; checkpoints made with the old tokenizer become useless); "
                        "with --seeds, once, before the first seed")
    return p


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise TinyMindError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    return stages


def seed_argv(args, parser, seed: int, first: bool) -> list[str]:
    """The command line of one seed of a --seeds run: --seed N --save_dir {save_dir}/seed{N} and the other
    flags the user gave (the tokenizer, shared by every seed, is retrained only before the first)."""
    argv = ["--seed", str(seed), "--save_dir", str(seed_dir(args.save_dir, seed))]
    for name in ("preset", "device", "stages"):
        if getattr(args, name) != parser.get_default(name):
            argv += [f"--{name}", getattr(args, name)]
    if args.force:
        argv.append("--force")
    if args.retrain_tokenizer and first:
        argv.append("--retrain_tokenizer")
    return argv


def run_seeds(args, parser, argv: list[str]) -> dict:
    """--seeds: the chain once per seed, in its own folder, then the spread report over them."""
    if args.seed is not None:
        raise TinyMindError("--seeds and --seed exclude each other (--seeds 42,1,2 runs every seed in its own folder)")
    seeds = parse_seeds(args.seeds)
    parse_stages(args.stages)   # a typo fails before the first seed trains
    for k, seed in enumerate(seeds):
        one = seed_argv(args, parser, seed, first=k == 0)
        print(f"[pipeline] seed {seed} ({k + 1}/{len(seeds)}): python scripts/run_pipeline.py {shlex.join(one)}",
              flush=True)
        try:
            main(one)
        except TinyMindError as e:
            raise TinyMindError(f"seed {seed}: {e}") from None
    save_dir = repo_path(args.save_dir)
    report = write_spread_report(save_dir, seeds, preset_hidden(args.preset), args.device, preset=args.preset,
                                 command="python scripts/run_pipeline.py " + shlex.join(argv))
    print(report["markdown"], end="")
    print(f"[pipeline] {len(seeds)} seeds done; report: {save_dir / 'spread_report.md'}")
    return report


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.seeds is not None:
        return run_seeds(args, parser, argv)
    stages = parse_stages(args.stages)
    args.save_dir = repo_path(args.save_dir)
    args.save_dir.mkdir(parents=True, exist_ok=True)
    hidden = preset_hidden(args.preset)
    recipe = STAGES[args.preset]
    t_start, timings, upstream_ran = time.time(), {}, False

    if args.retrain_tokenizer:
        print("[pipeline] tokenizer: retraining model/tokenizer.json", flush=True)
        timings["tokenizer"] = run_stage(["trainer/train_tokenizer.py"],
                                         args.save_dir / "pipeline_tokenizer.log")

    for stage in ORDER:
        if stage not in stages:
            continue
        cmd, done = stage_command(stage, recipe[stage], args, hidden)
        # Evaluation always runs; a stage is skipped only when nothing before it was retrained.
        resume = None if (stage == "eval" or args.force or upstream_ran) else unfinished_resume(done)
        if resume is not None:
            print(f"[pipeline] {stage}: {resume.name} records an unfinished run, continuing it", flush=True)
            cmd += ["--from_resume", "1"]
        elif stage != "eval" and done.exists() and not (args.force or upstream_ran):
            print(f"[pipeline] {stage}: {done.name} exists, skipped (use --force to rerun)", flush=True)
            timings[stage] = None
            continue
        print(f"[pipeline] {stage}: start  python {' '.join(cmd)}", flush=True)
        timings[stage] = run_stage(cmd, args.save_dir / f"pipeline_{stage}.log")
        upstream_ran = upstream_ran or stage in ("pretrain", "sft")
        print(f"[pipeline] {stage}: done in {timings[stage]:.1f}s", flush=True)

    total = time.time() - t_start
    report = {"preset": args.preset, "device": args.device, "seed": args.seed, "stage_seconds": timings,
              "total_seconds": round(total, 1),
              "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python scripts/run_pipeline.py " + " ".join(argv)}
    eval_json = args.save_dir / "eval_report.json"
    lines = [f"# TinyMind pipeline report ({args.preset})", "",
             "| stage | wall time |", "| --- | --- |"]
    lines += [f"| {s} | {'skipped' if t is None else f'{t:.1f}s'} |" for s, t in timings.items()]
    lines += [f"| total | {total:.1f}s |", ""]
    if eval_json.exists():
        report["eval"] = json.loads(eval_json.read_text(encoding="utf-8"))["summary"]
        lines += [(args.save_dir / "eval_report.md").read_text(encoding="utf-8"), ""]
    lines.append(f"{report['machine']}; `{report['command']}`; {report['date']}")
    atomic_write_text(args.save_dir / "pipeline_report.json", json.dumps(report, indent=1, ensure_ascii=False))
    atomic_write_text(args.save_dir / "pipeline_report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"[pipeline] finished in {total:.1f}s; report: {args.save_dir / 'pipeline_report.md'}")
    return report


if __name__ == "__main__":
    run_main(main)
