"""dev/lora_experiments.py: the six experiments end to end (--quick), resuming a sweep, the subspace
similarity on matrices with a known answer, and the chapter's tables against the committed results."""
import json
import math
from pathlib import Path

import pytest
import torch

from model.common import ROOT, run_main
from conftest import dev_script, expect_user_error, quiet
from tools.doc_blocks import find_blocks

lx = dev_script("lora_experiments")

RESULTS = ROOT / "docs" / "results" / "lora_experiments" / "lora_experiments.json"
CHAPTER = next((ROOT / "docs").glob("07-*.md"), None)


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """Every experiment on the random `smoke` model, a few steps each (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("lora_experiments")
    results, log = quiet(lx.main, ["--quick", "--out_dir", str(out), "--work_dir", str(out / "runs")])
    return out, results, log


@pytest.mark.slow   # trains the quick sweep
def test_quick_runs_every_experiment_and_draws_its_figure(quick_sweep):
    out, results, _ = quick_sweep
    saved = json.loads((out / "lora_experiments.json").read_text(encoding="utf-8"))
    assert set(saved["experiments"]) == set(lx.EXPERIMENTS)
    for name in lx.EXPERIMENTS:
        ids = saved["experiments"][name]["runs"]
        assert ids and all(i in saved["runs"] for i in ids), name
        png = out / f"exp_{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG", name
        table = lx.render(name, lx.experiment_runs(True)[name], saved["runs"], saved["experiments"][name]["extra"])
        assert table.count("\n") >= 2, name                   # header, rule and at least one row
    runs = saved["runs"]
    # every variant of the family trained and states its merge exactness (QLoRA refuses: W is 4-bit)
    from model.lora_variants import variants
    for v in variants():
        row = next(r for r in runs.values() if r.get("flags", {}).get("lora_variant") == v and r["task"] == "identity"
                   and r.get("merge_check"))
        assert row["trainable"] > 0 and row["steps"] == 4, v
        if v == "qlora":
            assert row["merge_error"] is None and "4-bit" in row["merge_note"]
        else:
            assert row["merge_error"] < 1e-4, (v, row["merge_error"])
    # full fine-tuning trains every weight, LoRA a small share; rsLoRA changes only the scaling
    full = runs["medical_full_lr0.001"]
    assert full["kind"] == "full" and full["trainable"] > 20 * runs["medical_r4"]["trainable"]
    assert runs["identity_rslora_r4"]["trainable"] == runs["identity_alpha_r_r4"]["trainable"]
    # the subspace similarity of the two ranks was computed from the saved A matrices
    sim = saved["experiments"]["rank"]["extra"]["similarity"]
    assert set(sim) == {"identity", "medical"}
    g = sim["medical"]["q_proj"]
    assert (g["r_lo"], g["r_hi"]) == (1, 4) and len(g["grid"]) == 1 and len(g["grid"][0]) == 4
    assert all(0 <= v <= 1 + 1e-9 for row in g["grid"] for v in row)
    # a run shared by experiments is trained once: medical r4 serves learn_forget, rank and targets' attn
    assert runs["medical_r4"]["score_every"] == 0 and "medical_attn" in runs


@pytest.mark.slow   # trains the quick sweep
def test_quick_family_shows_every_mechanism_at_work(quick_sweep):
    """Each variant's own mechanism left its mark (lx.MECHANISMS) and no variant run equals plain LoRA's."""
    out, _, _ = quick_sweep
    saved = json.loads((out / "lora_experiments.json").read_text(encoding="utf-8"))
    family = [r for r in lx.experiment_runs(True)["family"] if r.kind == "lora"]
    rows = saved["runs"]
    lora_row = rows[next(r.id for r in family if r.flags["lora_variant"] == "lora")]
    verdicts = {r.flags["lora_variant"]: lx.mechanism_verdict(r.flags["lora_variant"], rows[r.id], lora_row)
                for r in family}
    assert set(verdicts) == set(lx.MECHANISMS)
    assert all(v == "yes" for v in verdicts.values()), verdicts
    delta = rows[next(r.id for r in family if r.flags["lora_variant"] == "delta_lora")]
    assert delta["flags"]["delta_lora_start_step"] < delta["steps"]          # W moves inside the run
    assert delta["mechanism"]["moved"]["W"] > 0 and lora_row["mechanism"]["moved"]["W"] == 0
    table = lx.render("family", lx.experiment_runs(True)["family"], rows, {})
    assert "at work" in table and "NO" not in table


def test_a_variant_run_equal_to_plain_lora_is_caught():
    """The family's verdict fails a run that is plain LoRA under another name (Delta-LoRA whose W never
    moved: same loss curve and val loss), and a run whose mechanism left no trace."""
    facts = {"W_at_start_vs_sft": 0.0, "B_at_start": 0.0, "lr_scales": [1.0], "layers": 4, "distinct_A": 4,
             "moved": {"W": 0.0, "A": 0.1, "B": 0.2}}
    lora_row = {"loss_curve": [[1, 5.0], [2, 4.0]], "val_loss": 3.0, "mechanism": facts}
    same = {"loss_curve": [[1, 5.0], [2, 4.0]], "val_loss": 3.0, "mechanism": facts}
    assert lx.mechanism_verdict("lora", lora_row, lora_row) == "yes"
    assert lx.mechanism_verdict("delta_lora", same, lora_row).startswith("NO: same loss curve")
    differs_but_w_still = {"loss_curve": [[1, 5.0], [2, 3.9]], "val_loss": 2.9, "mechanism": facts}
    assert lx.mechanism_verdict("delta_lora", differs_but_w_still, lora_row).startswith("NO: W moves")
    moved = {**differs_but_w_still, "mechanism": {**facts, "moved": {"W": 1e-3, "A": 0.1, "B": 0.2}}}
    assert lx.mechanism_verdict("delta_lora", moved, lora_row) == "yes"
    assert lx.mechanism_verdict("lora_fa", moved, lora_row).startswith("NO: A frozen")    # A moved
    assert lx.mechanism_verdict("dora", {"val_loss": 1.0}, lora_row) == "— (not probed)"
    # the sweep itself starts Delta-LoRA's W updates inside the run, quick and full
    for quick, steps in ((True, 4), (False, 120)):
        run = next(r for r in lx.experiment_runs(quick)["family"] if r.flags.get("lora_variant") == "delta_lora")
        assert 0 < run.flags["delta_lora_start_step"] < steps and run.probe


@pytest.mark.slow   # trains the quick sweep
def test_a_finished_run_is_skipped_and_a_missing_one_retrained(quick_sweep, tmp_path):
    out, _, _ = quick_sweep
    path = out / "lora_experiments.json"
    _, log = quiet(lx.main, ["--quick", "--only", "scaling", "--out_dir", str(out), "--work_dir", str(out / "runs")])
    assert "0 run(s) to train, 4 already" in log
    saved = json.loads(path.read_text(encoding="utf-8"))
    kept = saved["runs"]["identity_rslora_r1"]
    del saved["runs"]["identity_alpha_r_r4"]
    path.write_text(json.dumps(saved), encoding="utf-8")
    _, log = quiet(lx.main, ["--quick", "--only", "scaling", "--out_dir", str(out), "--work_dir", str(out / "runs")])
    assert "1 run(s) to train, 3 already" in log and "identity_alpha_r_r4" in log
    again = json.loads(path.read_text(encoding="utf-8"))
    assert again["runs"]["identity_rslora_r1"] == kept                    # untouched
    assert again["runs"]["identity_alpha_r_r4"]["steps"] == 4


def test_bad_input_is_one_line(capsys, tmp_path):
    expect_user_error(capsys, lx.main, ["--quick", "--only", "rank,speed"], "unknown experiment", "speed")
    bad = tmp_path / "lora_experiments.json"
    bad.write_text("{not json", encoding="utf-8")
    expect_user_error(capsys, lx.main, ["--quick", "--only", "init", "--out_dir", str(tmp_path)],
                      "lora_experiments.json", "not a results file")
    assert bad.read_text(encoding="utf-8") == "{not json"                 # left as it was


def test_subspace_similarity_known_answers():
    d = 6
    e = torch.eye(d)
    A8 = torch.stack([3 * e[0], 2 * e[1], e[2]])         # top direction e0, then e1, then e2
    A64 = torch.stack([5 * e[1], 4 * e[0], e[4]])        # top direction e1, then e0, then e4
    phi = lx.subspace_similarity
    assert phi(A8, A8, 3, 3) == pytest.approx(1.0)
    assert phi(A8, A64, 1, 1) == pytest.approx(0.0, abs=1e-12)        # e0 vs e1: orthogonal
    assert phi(A8, A64, 1, 2) == pytest.approx(1.0)                   # e0 lies in span(e1, e0)
    assert phi(A8, A64, 2, 2) == pytest.approx(1.0)                   # the same plane, other order
    assert phi(A8, A64, 3, 3) == pytest.approx(2 / 3)                 # e2 vs e4 do not meet
    half = torch.stack([(e[0] + e[3]) / math.sqrt(2)])
    assert phi(half, A8, 1, 1) == pytest.approx(0.5)                  # 45 degrees: cos^2 = 1/2
    # invariant to scaling and to mixing the rows of A (only the subspace counts, not its basis)
    Q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].float()
    assert phi(A8, 7 * (Q @ A8), 3, 3) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not RESULTS.exists() or CHAPTER is None, reason="no committed experiment results")
def test_chapter_tables_equal_the_committed_results():
    """docs/07's tables are rendered from docs/results/lora_experiments/lora_experiments.json, row for row."""
    results = lx.load_results(RESULTS)
    assert set(results["experiments"]) == set(lx.EXPERIMENTS), "the committed sweep is missing experiments"
    text = CHAPTER.read_text(encoding="utf-8")
    blocks = [name for name, _ in find_blocks(text, lx.SOURCE, CHAPTER.name)]
    for name in lx.EXPERIMENTS:
        assert name in blocks, f"{CHAPTER.name}: no table for {name}"
        assert (RESULTS.parent / f"exp_{name}.png").exists(), name
    assert lx.render_blocks(text, results) == text, (
        f"{CHAPTER.name}: a table differs from {RESULTS.relative_to(ROOT)}; run "
        f"python dev/lora_experiments.py --out_dir docs/results/lora_experiments --render {CHAPTER.relative_to(ROOT)} --update")
    meta = results["meta"]
    assert meta["date"] in text and meta["command"] in text, "the chapter must quote the sweep's command and date"
