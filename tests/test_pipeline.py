"""scripts/run_pipeline.py, scripts/evaluate.py and its scoring (tools/scoring.py).

- scoring on a fixture whose scores are known (keyword QA, identity shares, per-kind accuracy);
- evaluate_model with a stand-in model that answers from a table: exact expected scores;
- the whole chain end to end on a few steps of the smoke preset in tmp_path (files, report, chart);
- a pipeline whose middle stage was interrupted continues it with --from_resume 1 and skips finished stages.
"""
import json

import pytest
import torch

from model.common import TinyMindError, atomic_save, safe_load
from scripts import evaluate as E
from tools import scoring
from scripts import run_pipeline as P
from conftest import dev_script

QA = [{"question": "小明的职业是什么？", "answers": ["医生"], "kind": "a", "reference": "小明是医生。"},
      {"question": "小红住在哪里？", "answers": ["北京", "京城"], "kind": "a", "reference": "小红住在北京。"},
      {"question": "猫吃什么？", "answers": ["鱼"], "kind": "b", "reference": "猫吃鱼。"},
      {"question": "狗会做什么？", "answers": ["看家"], "kind": "b", "reference": "狗会看家。"}]
IDENT = [{"question": "你是谁？", "base_names": ["TinyMind"], "new_names": ["知微"]},
         {"question": "你叫什么？", "base_names": ["TinyMind"], "new_names": ["知微"]},
         {"question": "介绍一下你自己", "base_names": ["TinyMind"], "new_names": ["知微"]},
         {"question": "谁做了你？", "base_names": ["TinyMind"], "new_names": ["知微"]}]


def test_scoring_on_a_known_fixture():
    s = scoring.score_qa(QA, ["他是一名医生。", "她住在京城。", "猫爱吃老鼠。", "不知道"])
    assert s["accuracy"] == 0.5 and s["n"] == 4
    assert s["by_kind"] == {"a": {"accuracy": 1.0, "n": 2}, "b": {"accuracy": 0.0, "n": 2}}
    i = scoring.score_identity(IDENT, ["我是tinymind。", "我是知微。", "我是知微，不是TinyMind", "你好"])
    assert i == {"base_share": 0.5, "new_share": 0.5, "n": 4}


class TableModel(torch.nn.Module):
    """Answers each prompt from a table: generate() appends the encoded reply and <|im_end|>."""

    def __init__(self, tok, replies):
        super().__init__()
        self.tok, self.replies, self.w = tok, replies, torch.nn.Parameter(torch.zeros(1))

    def generate(self, ids, max_new_tokens, temperature, eos_token_id, attention_mask):
        rows = []
        for row, mask in zip(ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=False)
            question = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            eos = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id   # end-of-turn ids
            rows.append(row + self.tok.encode(self.replies[question]) + [eos])
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])

    def forward(self, ids, labels=None):
        logits = torch.zeros(*ids.shape, len(self.tok))
        return type("Out", (), {"loss": torch.tensor(1.0), "logits": logits})()


def test_evaluate_model_gives_the_expected_scores():
    from model.tokenizer import load_tokenizer
    tok = load_tokenizer()
    replies = {"小明的职业是什么？": "医生", "小红住在哪里？": "上海", "猫吃什么？": "鱼", "狗会做什么？": "看家",
               "你是谁？": "我是知微", "你叫什么？": "我是TinyMind", "介绍一下你自己": "知微", "谁做了你？": "不告诉你"}
    sets = {"general_qa": QA, "identity": IDENT}
    res = scoring.evaluate_model(TableModel(tok, replies), tok, sets, "cpu", batch_size=3)
    assert res["general_qa"]["accuracy"] == 0.75
    assert res["identity"]["new_share"] == 0.5 and res["identity"]["base_share"] == 0.25
    assert res["heldout"]["loss"] == pytest.approx(1.0)
    row = E.summary_row("x", res)
    assert row["general_qa"] == 0.75 and row["medical_qa"] is None
    assert "75.0%" in E.markdown_table([row])


def test_a_set_without_reference_replies_has_no_heldout_loss():
    """Hand-written sets (dataset/eval_novel) give answer words, not reference replies: the held-out loss is
    None and the report prints "—", not the loss of a bare answer word the model would never say alone."""
    from model.tokenizer import load_tokenizer
    tok = load_tokenizer()
    bare = [{k: v for k, v in it.items() if k != "reference"} for it in QA]
    replies = {"小明的职业是什么？": "医生", "小红住在哪里？": "上海", "猫吃什么？": "鱼", "狗会做什么？": "看家"}
    res = scoring.evaluate_model(TableModel(tok, replies), tok, {"medical_qa": bare}, "cpu", batch_size=3)
    assert res["medical_qa"]["accuracy"] == 0.75
    assert res["heldout"] == {"loss": None, "ppl": None, "tokens": 0}
    row = E.summary_row("+m", res)
    assert row["heldout_loss"] is None and E.markdown_table([row]).endswith("| 75.0% | — |")


def test_bad_eval_file_is_one_clear_error(tmp_path):
    (tmp_path / "general_qa.jsonl").write_text('{"question": "a", "answers": ["b"]}\n{oops\n', encoding="utf-8")
    with pytest.raises(TinyMindError, match="general_qa.jsonl line 2"):
        scoring.load_eval_sets(tmp_path)
    with pytest.raises(TinyMindError, match="no evaluation sets"):
        scoring.load_eval_sets(tmp_path / "empty")


FAST = {"pretrain": ["--max_steps", "3", "--batch_size", "4", "--max_seq_len", "64"],
        "sft": ["--max_steps", "3", "--batch_size", "4", "--max_seq_len", "64"],
        "lora_identity": ["--max_steps", "2", "--batch_size", "4", "--max_seq_len", "64", "--lora_rank", "2"],
        "lora_medical": ["--max_steps", "2", "--batch_size", "4", "--max_seq_len", "64", "--lora_rank", "2"],
        "eval": ["--limit", "4", "--max_new_tokens", "4"]}


def test_tiny_stages_are_the_scripts_defaults(tmp_path):
    """For `tiny` the pipeline passes file names only (plus STAGES' own flags, listed there), so each
    script run alone trains the same model."""
    import argparse
    from trainer import train_lora, train_pretrain, train_sft
    parsers = {"pretrain": train_pretrain.build_parser, "sft": train_sft.build_parser,
               "lora_identity": train_lora.build_parser, "lora_medical": train_lora.build_parser}
    args = argparse.Namespace(save_dir=tmp_path, device="auto", seed=None, preset="tiny")
    for stage, build in parsers.items():
        cmd, _ = P.stage_command(stage, P.STAGES["tiny"][stage], args, 192)
        via_pipeline = vars(build().parse_args(cmd[1:]))
        alone = vars(build().parse_args((["--data_path", f"dataset/{stage}.jsonl", "--lora_name", stage]
                                         if stage.startswith("lora_") else []) + P.STAGES["tiny"][stage]))
        differ = {k for k in alone if alone[k] != via_pipeline[k]}
        assert differ <= {"save_dir", "device", "hidden_size"}, (stage, differ)
    args.seed = 7   # --seed reaches every training stage, not the evaluation
    for stage in P.ORDER:
        cmd, _ = P.stage_command(stage, P.STAGES["tiny"][stage], args, 192)
        assert ("--seed" in cmd and cmd[cmd.index("--seed") + 1] == "7") == (stage != "eval"), stage


@pytest.mark.slow   # the whole chain, trained
def test_pipeline_end_to_end_and_resume_of_an_interrupted_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(P.STAGES, "smoke", FAST)
    report = P.main(["--preset", "smoke", "--save_dir", str(tmp_path), "--device", "cpu"])
    for name in ("pretrain_64.pth", "full_sft_64.pth", "lora_identity_64.pth", "lora_medical_64.pth",
                 "eval_report.json", "eval_report.md", "eval_chart.png", "pipeline_report.md", "pipeline_report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert [r["variant"] for r in report["eval"]] == ["SFT", "+identity", "+medical", "+both"]
    assert set(report["stage_seconds"]) == {"pretrain", "sft", "lora_identity", "lora_medical", "eval"}
    assert json.loads((tmp_path / "pipeline_report.json").read_text())["preset"] == "smoke"

    # Pretend the SFT stage was interrupted: its resume file says "not finished".
    resume = tmp_path / "full_sft_64_resume.pth"
    state = safe_load(resume, "resume file")
    state["finished"] = False
    atomic_save(state, resume)
    capsys.readouterr()
    P.main(["--preset", "smoke", "--save_dir", str(tmp_path), "--device", "cpu", "--stages", "pretrain,sft"])
    out = capsys.readouterr().out
    assert "pretrain: pretrain_64.pth exists, skipped" in out
    assert "records an unfinished run, continuing it" in out and "--from_resume 1" in out
    assert safe_load(resume, "resume file")["finished"] is True


def test_pipeline_rejects_unknown_stage(tmp_path):
    with pytest.raises(TinyMindError, match="unknown stage"):
        P.main(["--save_dir", str(tmp_path), "--stages", "pretrain,finetune"])


def test_compare_runs_reports_each_seed_and_the_spread(tmp_path, capsys):
    compare_runs = dev_script("compare_runs")
    for name, g, m in (("seed42", 0.80, 0.70), ("seed1", 0.76, 0.75)):
        (tmp_path / name).mkdir()
        rows = [{"variant": "SFT", "general_qa": g, "identity_new": 0.0, "identity_base": 1.0, "medical_qa": 0.02},
                {"variant": "+medical", "general_qa": g - 0.02, "identity_new": 0.0, "identity_base": 0.9,
                 "medical_qa": m}]
        report = {"eval": rows, "stage_seconds": {"pretrain": 100.0, "eval": None}, "total_seconds": 300.0,
                  "command": "python scripts/run_pipeline.py", "machine": "x86_64", "date": "2026-12-01"}
        (tmp_path / name / "pipeline_report.json").write_text(json.dumps(report), encoding="utf-8")
    text = compare_runs.main([str(tmp_path / "seed42"), str(tmp_path / "seed1"), "--out", str(tmp_path / "c.md")])
    assert "| SFT | general QA | 80.0% | 76.0% | 78.0% | 4.0 |" in text
    assert "| +medical | medical QA | 70.0% | 75.0% | 72.5% | 5.0 |" in text
    assert "| eval | skipped | skipped |" in text and "| total | 300 s | 300 s |" in text
    assert (tmp_path / "c.md").read_text(encoding="utf-8") == text
    with pytest.raises(SystemExit) as e:
        from model.common import run_main
        run_main(compare_runs.main, [str(tmp_path / "nothing")])
    assert e.value.code == 2 and "pipeline_report.json not found" in capsys.readouterr().err
