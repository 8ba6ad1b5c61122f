"""trainer/train_lora.py: LoRA training on the shared loop, on top of a smoke full_sft checkpoint.

Only the adapters may change (the base stays bit-identical), the LoRA file must load back onto the base
and reproduce the trained model, and --from_resume 1 must continue exactly.
"""
import pytest
import torch

from model.common import safe_load
from model.model import load_model
from model.model_lora import base_state_dict, load_lora
from conftest import assert_bitwise_equal, expect_user_error, lora_argv, quiet, run_interrupted, snapshot, with_base
from trainer import train_lora, trainer_utils


@pytest.mark.slow   # trains
def test_lora_trains_only_adapters_and_file_loads(ws, tmp_path, monkeypatch):
    out = with_base(ws, tmp_path)
    captured = {}
    real_save = train_lora.save_lora

    def spy(model, path, **kw):  # keep the live model as it was when its LoRA file was written
        captured["model"] = model
        return real_save(model, path, **kw)

    monkeypatch.setattr(train_lora, "save_lora", spy)
    metrics, log = quiet(train_lora.main, lora_argv(ws, out, "--max_steps", 24))
    assert metrics["steps"] == 24
    assert "LoRA lora_identity: rank 4, alpha 8" in log and "trainable = " in log and "% of total" in log
    for f in ("lora_identity_64.pth", "lora_identity_64_resume.pth", "lora_identity_64_log.csv",
              "lora_identity_64_loss.png"):
        assert (out / f).is_file(), f
    rows = trainer_utils.read_csv_rows(out / "lora_identity_64_log.csv")
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert train[-1] < train[0]

    # the base weights are bit-identical to the checkpoint the run started from
    live = captured["model"]
    assert_bitwise_equal(base_state_dict(live), safe_load(ws["sft_ckpt"])["model"])
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in live.named_parameters())

    # the files hold the adapters only; the LoRA file rebuilds the trained model on the base
    lora_file = safe_load(out / "lora_identity_64.pth")
    assert lora_file["lora_name"] == "lora_identity" and lora_file["from_weight"] == "full_sft"
    assert any(t.abs().sum() > 0 for k, t in lora_file["adapter"].items() if k.endswith("lora_B"))
    resume = safe_load(out / "lora_identity_64_resume.pth")
    assert resume["model"] and all("lora_" in k for k in resume["model"])
    model, _ = load_model(out / "full_sft_64.pth")
    x = torch.randint(3, 300, (2, 16))
    base_logits = model(x).logits
    assert load_lora(model, out / "lora_identity_64.pth") == "lora_identity"
    live.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, live(x).logits)
        assert not torch.allclose(model(x).logits, base_logits)


@pytest.mark.slow   # trains
def test_lora_resume_exact_and_refuses_other_rank(ws, tmp_path, monkeypatch, capsys):
    argv = ["--epochs", 2, "--max_steps", 20]
    straight, cut = with_base(ws, tmp_path, "straight"), with_base(ws, tmp_path, "cut")
    quiet(train_lora.main, lora_argv(ws, straight, *argv))

    run_interrupted(monkeypatch, 17, train_lora.main, lora_argv(ws, cut, *argv))
    before = snapshot(cut)
    expect_user_error(capsys, train_lora.main, lora_argv(ws, cut, *argv, "--from_resume", 1, "--lora_rank", 8),
                      "different run", "lora_rank")
    assert snapshot(cut) == before
    _, log = quiet(train_lora.main, lora_argv(ws, cut, *argv, "--from_resume", 1))
    assert "at step 17/20" in log
    assert_bitwise_equal(safe_load(straight / "lora_identity_64.pth")["adapter"],
                         safe_load(cut / "lora_identity_64.pth")["adapter"])


def test_lora_bad_input(ws, tmp_path, capsys):
    out = with_base(ws, tmp_path)
    before = snapshot(out)
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--from_weight", "full_sft2"),
                      "full_sft2", "full_sft_64")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--lora_name", "my-lora"), "my-lora")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--lora_targets", "nothing_proj"), "nothing_proj")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--data_path", str(tmp_path / "x.jsonl")),
                      "not found")
    assert snapshot(out) == before
