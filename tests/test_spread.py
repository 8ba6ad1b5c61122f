"""The spread report over seeds (tools/spread.py) and ``scripts/run_pipeline.py --seeds``.

- the spread table and the targets from fake per-seed eval_report.json / pipeline_report.json files:
  min / median / max, drops taken within a seed, PASS / MISS exactly at the limits, wall times of runs
  that skipped stages left out;
- the per-kind table of scripts/evaluate.py (medical departments and symptoms apart);
- ``--seeds``: parsing, bad values and ``--seed`` beside it (one-line errors, exit 2), the per-seed command
  lines, a failing seed named with its log, the report written after the last seed (stages stubbed);
- the chat examples on a random smoke model with two random LoRA files: each variant's reply is the chat
  program's temperature-0 reply with those adapters;
- (slow) the chain on the smoke preset for two seeds, pretrain -> SFT -> evaluation: the real subprocesses
  (the LoRA stages, tested apart, are left out to keep it short).
"""
import json

import pytest
import torch

from conftest import expect_user_error, randomize_lora_B
from model.common import TinyMindError
from scripts import evaluate as E
from scripts import run_pipeline as P
from tools import spread as S


def summary(general, new, base, medical, dept, symptom, loss):
    """One summary row's numbers, in eval_report.json's form (fractions)."""
    return {"general_qa": general, "identity_new": new, "identity_base": base, "medical_qa": medical,
            "heldout_loss": loss, "heldout_ppl": 1.0,
            "medical_qa_by_kind": {"medical_department": {"accuracy": dept, "n": 88},
                                   "medical_symptom": {"accuracy": symptom, "n": 62}}}


def write_seed(root, seed, rows, total=600.0, skipped=()):
    """A seed folder as a --seeds run leaves it: eval_report.json with ``rows`` (variant -> summary) and
    pipeline_report.json with ``total`` seconds; ``skipped`` stages have no time (their files existed)."""
    d = S.seed_dir(root, seed)
    d.mkdir(parents=True)
    report = {"summary": [{"variant": v, **r} for v, r in rows.items()], "results": {}}
    (d / "eval_report.json").write_text(json.dumps(report), encoding="utf-8")
    seconds = {s: (None if s in skipped else 100.0) for s in S.ORDER}
    (d / "pipeline_report.json").write_text(json.dumps({"stage_seconds": seconds, "total_seconds": total}),
                                            encoding="utf-8")
    return d


# Three seeds. Seed 1 has the best SFT general QA but the worst drop under +identity: its drop (80 -> 77, 3
# points, exactly the limit) is the worst one within a seed, while the lowest +identity score (seed 2's 70%)
# minus the highest SFT score (seed 1's 80%) would be 10 points.
SEEDS = {
    42: {"SFT": summary(0.75, 0.0, 1.00, 0.10, 0.0, 0.0, 7.0),
         "+identity": summary(0.76, 0.95, 0.0, 0.0, 0.0, 0.0, 6.0),
         "+medical": summary(0.74, 0.0, 1.0, 0.75, 0.90, 0.50, 2.5),
         "+both": summary(0.70, 0.90, 0.0, 0.65, 0.9, 0.5, 3.0)},
    1: {"SFT": summary(0.80, 0.0, 0.96, 0.02, 0.0, 0.0, 6.8),
        "+identity": summary(0.77, 1.0, 0.0, 0.0, 0.0, 0.0, 6.1),
        "+medical": summary(0.75, 0.0, 1.0, 0.85, 0.95, 0.60, 2.4),
        "+both": summary(0.72, 0.92, 0.0, 0.70, 0.95, 0.55, 3.1)},
    2: {"SFT": summary(0.70, 0.0, 0.95, 0.0, 0.0, 0.0, 6.9),
        "+identity": summary(0.70, 1.0, 0.0, 0.0, 0.0, 0.0, 6.2),
        "+medical": summary(0.69, 0.0, 1.0, 0.80, 1.0, 0.55, 2.6),
        "+both": summary(0.66, 0.95, 0.0, 0.66, 0.9, 0.52, 3.2)},
}


@pytest.fixture
def three_seeds(tmp_path):
    for seed, rows in SEEDS.items():
        write_seed(tmp_path, seed, rows, total={42: 890.0, 1: 900.0, 2: 300.0}[seed],
                   skipped=("pretrain", "sft") if seed == 2 else ())
    return tmp_path, [S.load_seed_run(s, S.seed_dir(tmp_path, s)) for s in SEEDS]


def by_target(checks):
    return {c["target"]: c for c in checks}


def test_spread_is_min_median_max_over_the_seeds(three_seeds):
    _, runs = three_seeds
    table = S.spread(runs)
    assert list(table) == ["SFT", "+identity", "+medical", "+both"]
    assert table["SFT"]["general_qa"] == {"min": 70.0, "median": 75.0, "max": 80.0, "n": 3}
    assert table["+medical"]["medical_symptom"]["median"] == pytest.approx(55.0)
    assert table["+both"]["heldout_loss"] == {"min": 3.0, "median": 3.1, "max": 3.2, "n": 3}
    assert S.spread_cell(table["SFT"]["general_qa"], "%", 3) == "70.0 / 75.0 / 80.0%"
    assert S.spread_cell({"min": 1, "median": 2, "max": 3, "n": 2}, "", 3) == "1.000 / 2.000 / 3.000 (2 of 3 seeds)"


def test_targets_are_judged_on_the_worst_seed_at_their_limits(three_seeds):
    _, runs = three_seeds
    checks = by_target(S.check_targets(runs))
    assert len(checks) == len(S.TARGETS)
    # SFT general QA misses (seed 2: 70%); every other target sits exactly on its limit on its worst seed
    sft_general = checks["SFT: general QA ≥ 75%"]
    assert sft_general["value"] == 70.0 and sft_general["worst_seed"] == 2 and sft_general["status"] == "MISS"
    assert checks["SFT: base persona ≥ 95%"]["status"] == "PASS"                   # seed 2: 95.0
    assert checks["SFT: medical QA ≤ 10%"]["status"] == "PASS"                     # seed 42: 10.0
    drop = checks["+identity: general QA drop from SFT ≤ 3 points"]
    assert drop["value"] == pytest.approx(3.0) and drop["worst_seed"] == 1 and drop["status"] == "PASS"
    assert drop["per_seed"][42] == pytest.approx(-1.0)                               # a rise is a negative drop
    assert checks["+medical: medical QA ≥ 75%"]["status"] == "PASS"                # seed 42: 75.0
    assert checks["+medical: medical departments ≥ 90%"]["status"] == "PASS"
    assert checks["+medical: medical symptoms ≥ 50%"]["status"] == "PASS"
    assert checks["+medical: general QA drop from SFT ≤ 5 points"]["value"] == pytest.approx(5.0)
    assert checks["+both: new persona ≥ 90%"]["status"] == "PASS"
    assert checks["+both: medical QA ≥ 65%"]["status"] == "PASS"
    assert checks["+both: general QA drop from SFT ≤ 8 points"]["value"] == pytest.approx(8.0)
    assert checks["+both: general QA drop from SFT ≤ 8 points"]["status"] == "PASS"
    spread = checks["+medical: medical QA max − min over the seeds ≤ 10 points"]
    assert spread["value"] == pytest.approx(10.0) and spread["status"] == "PASS"   # 75% to 85%
    wall = checks["pipeline wall time per seed ≤ 900 s (15 min)"]
    # seed 2 skipped pretrain and SFT: its 300 s is not a full run and does not count
    assert wall["value"] == 900.0 and wall["per_seed"][2] is None and wall["status"] == "PASS"


def test_a_hair_past_a_limit_is_a_miss(tmp_path):
    rows = {v: dict(r) for v, r in SEEDS[42].items()}
    rows["SFT"] = summary(0.75, 0.0, 0.9499, 0.1001, 0.0, 0.0, 7.0)
    rows["+identity"] = summary(0.7199, 0.95, 0.0, 0.0, 0.0, 0.0, 6.0)              # drop 3.01 points
    rows["+medical"] = summary(0.74, 0.0, 1.0, 0.7499, 0.8999, 0.4999, 2.5)
    write_seed(tmp_path, 7, rows, total=900.1)
    checks = by_target(S.check_targets([S.load_seed_run(7, S.seed_dir(tmp_path, 7))]))
    for name in ("SFT: base persona ≥ 95%", "SFT: medical QA ≤ 10%", "+identity: general QA drop from SFT ≤ 3 points",
                 "+medical: medical QA ≥ 75%", "+medical: medical departments ≥ 90%",
                 "+medical: medical symptoms ≥ 50%", "pipeline wall time per seed ≤ 900 s (15 min)"):
        assert checks[name]["status"] == "MISS", name
    assert checks["SFT: general QA ≥ 75%"]["status"] == "PASS"
    assert checks["+medical: medical QA max − min over the seeds ≤ 10 points"]["status"] == "—"   # one seed


def test_report_files_and_a_target_no_seed_measured(three_seeds):
    root, _ = three_seeds
    for seed in SEEDS:   # no seed a full run: the wall-time target cannot be judged
        path = S.seed_dir(root, seed) / "pipeline_report.json"
        rep = json.loads(path.read_text())
        rep["stage_seconds"]["pretrain"] = None
        path.write_text(json.dumps(rep))
    report = S.write_spread_report(root, list(SEEDS), command="python scripts/run_pipeline.py --seeds 42,1,2",
                                   preset="tiny", chat=False)
    text = (root / "spread_report.md").read_text(encoding="utf-8")
    assert text == report["markdown"]
    assert "| SFT | 70.0 / 75.0 / 80.0% |" in text
    assert "| +identity: general QA drop from SFT ≤ 3 points | worst +3.0 points (seed 1) | PASS |" in text
    assert "| pipeline wall time per seed ≤ 900 s (15 min) | seed 42 not a full run, seed 1 not a full run, " \
           "seed 2 not a full run | — |" in text
    assert "| 2 | 300.0 s | pretrain, sft skipped" in text
    assert "`python scripts/run_pipeline.py --seeds 42,1,2`" in text and "Machine: " in text
    saved = json.loads((root / "spread_report.json").read_text(encoding="utf-8"))
    assert saved["seeds"] == [42, 1, 2] and saved["spread"]["SFT"]["general_qa"]["median"] == 75.0
    assert {c["status"] for c in saved["targets"]} <= {"PASS", "MISS", "—"}


def test_a_seed_folder_without_reports_is_a_clear_error(tmp_path):
    with pytest.raises(TinyMindError, match=r"seed5[/\\]eval_report.json not found: run .*--seed 5"):
        S.load_seed_run(5, S.seed_dir(tmp_path, 5))


def test_the_kind_table_shows_departments_and_symptoms_apart():
    rows = [{"variant": "SFT", **summary(0.5, 0, 1, 0.0, 0.0, 0.0, 1.0),
             "general_qa_by_kind": {"all": {"accuracy": 0.5, "n": 4}}},
            {"variant": "+medical", **summary(0.5, 0, 1, 0.587, 0.955, 0.065, 1.0)}]
    table = E.kind_table(rows)
    assert table.splitlines()[0] == "| variant | medical: medical_department (88) | medical: medical_symptom (62) |"
    assert "| +medical | 95.5% | 6.5% |" in table
    assert E.kind_table([{"variant": "SFT"}]) == ""


# ----------------------------------------------------------------------------- --seeds

@pytest.mark.parametrize("text, seeds", [("42,1,2", [42, 1, 2]), (" 7 , 0,", [7, 0])])
def test_parse_seeds(text, seeds):
    assert S.parse_seeds(text) == seeds


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "1,x"], "'x' is not a non-negative integer"),
    (["--seeds", "1,-2"], "'-2' is not a non-negative integer"),
    (["--seeds", "1.5"], "'1.5' is not"),
    (["--seeds", "3,3"], "seed 3 is given twice"),
    (["--seeds", ","], "no seed given"),
    (["--seeds", "1,2", "--seed", "3"], "--seeds and --seed exclude each other"),
    (["--seeds", "1,2", "--stages", "pretrain,finetune"], "unknown stage"),
])
def test_bad_seeds_are_one_line_errors(tmp_path, capsys, argv, needle):
    expect_user_error(capsys, P.main, argv + ["--save_dir", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()   # nothing ran


def fake_stages(monkeypatch, fail=None):
    """Replace every stage with a stub that writes the stage's file (and the eval reports) instantly;
    the stage ``fail`` = (seed folder name, stage) fails as a real one would. Returns the commands run."""
    ran = []

    def run_stage(cmd, log_path):
        save_dir = log_path.parent
        stage = log_path.stem.removeprefix("pipeline_")
        ran.append((save_dir.name, stage, cmd))
        if (save_dir.name, stage) == fail:
            raise TinyMindError(f"stage `python {' '.join(cmd)}` failed with exit status 1; log: {log_path}")
        if stage == "eval":
            seed = int(save_dir.name.removeprefix("seed"))
            rows = SEEDS[seed if seed in SEEDS else 42]
            report = {"summary": [{"variant": v, **r} for v, r in rows.items()], "results": {}}
            (save_dir / "eval_report.json").write_text(json.dumps(report), encoding="utf-8")
            (save_dir / "eval_report.md").write_text("| variant | general QA |\n", encoding="utf-8")
        else:
            name = {"pretrain": "pretrain", "sft": "full_sft"}.get(stage, stage)
            (save_dir / f"{name}_64.pth").write_bytes(b"x")
        return 1.0

    monkeypatch.setattr(P, "run_stage", run_stage)
    monkeypatch.setattr(S, "chat_examples", lambda folder, *a, **k: {"SFT": [folder.name] * len(S.CHAT_PROMPTS)})
    return ran


def test_seeds_run_each_seed_in_its_folder_then_the_report(tmp_path, monkeypatch, capsys):
    ran = fake_stages(monkeypatch)
    report = P.main(["--preset", "smoke", "--seeds", "42,1", "--save_dir", str(tmp_path), "--device", "cpu"])
    assert [(d, s) for d, s, _ in ran] == [(f"seed{n}", s) for n in (42, 1) for s in P.ORDER]
    for folder, stage, cmd in ran:   # each seed's stages get its --seed and its folder
        assert cmd[cmd.index("--save_dir") + 1] == str(tmp_path / folder)
        if stage != "eval":
            assert cmd[cmd.index("--seed") + 1] == folder.removeprefix("seed")
    seed42 = json.loads((tmp_path / "seed42" / "pipeline_report.json").read_text())
    assert seed42["seed"] == 42
    assert seed42["command"] == f"python scripts/run_pipeline.py --seed 42 --save_dir {tmp_path / 'seed42'} " \
                                "--preset smoke --device cpu"
    text = (tmp_path / "spread_report.md").read_text(encoding="utf-8")
    assert report["seeds"] == [42, 1] and "| SFT | 75.0 / 77.5 / 80.0% |" in text
    assert "### seed 1" in text and "| 你是谁？ | seed1 |" in text
    assert text in capsys.readouterr().out

    ran.clear()   # a second run reuses every seed's files, as a single run does
    P.main(["--preset", "smoke", "--seeds", "42,1", "--save_dir", str(tmp_path), "--device", "cpu"])
    assert [(d, s) for d, s, _ in ran] == [("seed42", "eval"), ("seed1", "eval")]
    assert "| 42 | " in (tmp_path / "spread_report.md").read_text() and "not a full run" in \
        (tmp_path / "spread_report.md").read_text()


def test_a_failing_seed_stops_with_its_seed_and_log(tmp_path, monkeypatch, capsys):
    ran = fake_stages(monkeypatch, fail=("seed1", "sft"))
    err = expect_user_error(capsys, P.main, ["--preset", "smoke", "--seeds", "42,1,2", "--save_dir", str(tmp_path)],
                            "seed 1: stage", f"log: {tmp_path / 'seed1' / 'pipeline_sft.log'}")
    assert "exit status 1" in err
    assert {d for d, _, _ in ran} == {"seed42", "seed1"}   # seed 2 never started
    assert not (tmp_path / "spread_report.md").exists()


# ----------------------------------------------------------------------------- chat examples

def test_chat_examples_are_each_variants_temperature_0_chat_reply(tmp_path):
    from model.engine import encode_chat, generate_reply, load_chat_model
    from model.model import TinyMindForCausalLM, get_config, load_model, save_model
    from model.model_lora import apply_lora, save_lora

    torch.manual_seed(0)
    base = save_model(TinyMindForCausalLM(get_config("smoke")), tmp_path / "full_sft_64.pth",
                      stage="sft", weight="full_sft")
    for seed, name in enumerate(("lora_identity", "lora_medical"), 1):
        model, _ = load_model(base)
        apply_lora(model, adapter_name=name, rank=4, alpha=16.0)
        randomize_lora_B(model, name, seed=seed, std=0.5)
        save_lora(model, tmp_path / f"{name}_64.pth", adapter_name=name)
    prompts = S.CHAT_PROMPTS[:2]
    examples = S.chat_examples(tmp_path, 64, "cpu", prompts=prompts, max_new_tokens=6)
    assert list(examples) == ["SFT", "+identity", "+medical", "+both"]
    for label, names in S.COMPARE:
        chat = load_chat_model(tmp_path, "full_sft", adapters=list(names), device="cpu", dtype="float32")
        want = [generate_reply(chat.model, chat.tok, encode_chat(chat.tok, [{"role": "user", "content": p}]), 6,
                               temperature=0.0)[0].strip() for p in prompts]
        assert examples[label] == want, label
    assert len({tuple(r) for r in examples.values()}) == 4   # every variant answers differently


# ----------------------------------------------------------------------------- end to end

FAST = {"pretrain": ["--max_steps", "2", "--batch_size", "4", "--max_seq_len", "64"],
        "sft": ["--max_steps", "2", "--batch_size", "4", "--max_seq_len", "64"],
        "eval": ["--limit", "2", "--max_new_tokens", "2"]}


@pytest.mark.slow   # two seeds of the chain, trained in subprocesses (the LoRA stages left out: see above)
def test_seeds_end_to_end_on_the_smoke_preset(tmp_path, monkeypatch):
    monkeypatch.setitem(P.STAGES, "smoke", FAST)
    report = P.main(["--preset", "smoke", "--seeds", "3,4", "--save_dir", str(tmp_path), "--device", "cpu",
                     "--stages", "pretrain,sft,eval"])
    for seed in (3, 4):
        folder = tmp_path / f"seed{seed}"
        for name in ("full_sft_64.pth", "eval_report.json", "pipeline_report.json"):
            assert (folder / name).stat().st_size > 0, (seed, name)
        assert json.loads((folder / "pipeline_report.json").read_text())["seed"] == seed
    assert list(report["spread"]) == ["SFT"] and report["spread"]["SFT"]["general_qa"]["n"] == 2
    assert set(report["chat"]) == {3, 4} and len(report["chat"][3]["SFT"]) == len(S.CHAT_PROMPTS)
    assert report["per_seed"][3]["skipped"] == ["lora_identity", "lora_medical"]   # not among --stages
    assert (tmp_path / "spread_report.md").read_text(encoding="utf-8") == report["markdown"]


def test_doc_tables_of_a_saved_report(three_seeds):
    """The README's tables, from the report as read back from spread_report.json (seed keys are strings)."""
    root, _ = three_seeds
    S.write_spread_report(root, list(SEEDS), preset="tiny", chat=False)
    report = json.loads((root / "spread_report.json").read_text(encoding="utf-8"))
    report["chat"] = {str(s): {v: [f"{v} {s} {k}" for k in range(len(S.CHAT_PROMPTS))] for v in S.VARIANTS}
                      for s in SEEDS}
    tables = S.doc_tables(report)
    assert "| SFT | 70.0–80.0% | 0.0% | 95.0–100.0% |" in tables["spread"]   # min–max; one value where all agree
    assert tables["spread"].count("\n") == 1 + len(S.VARIANTS)
    assert "| +identity: general QA drop from SFT ≤ 3 points | -1.0 / 3.0 / 0.0 points | PASS |" in tables["targets"]
    assert "| pipeline wall time per seed ≤ 900 s (15 min) | 890 / 900 / — s | PASS |" in tables["targets"]
    rows = tables["chat"].splitlines()
    assert rows[0] == "| prompt | variant | seed 42 | seed 1 | seed 2 |" and len(rows) == 2 + len(S.DOC_CHAT)
    assert rows[2] == f"| {S.CHAT_PROMPTS[0]} | +identity | +identity 42 0 | +identity 1 0 | +identity 2 0 |"
