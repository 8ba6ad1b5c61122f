"""train_lora.py --lora_variant NAME for LoRA-FA, Delta-LoRA and LoRA-drop, beyond the shared smoke test.

Delta-LoRA must write its new base, and its file must load (and merge) on that base only; LoRA-drop's file
must list its kept and shared layers and share them again when loaded; LoRA-FA's A must stay frozen; both
training-time variants must resume exactly; a bad flag is a one-line error.
"""
import pytest
import torch

from model.common import TinyMindError, safe_load
from model.model import load_model
from model.model_lora import load_lora, lora_modules, merge_lora
from conftest import assert_bitwise_equal, expect_user_error, make_workspace, quiet, save_smoke_sft
from trainer import train_lora

OURS = ("lora_fa", "delta_lora", "lora_drop")   # what tests/test_lora_variants_smoke.py does not check


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("variants_ws"))
    ws["sft_ckpt"] = save_smoke_sft(ws, ws["root"] / "base" / "full_sft_64.pth")
    return ws


def argv(ws, out, variant, *extra):
    return [str(a) for a in ("--data_path", ws["sft"], "--tokenizer_path", ws["tok"], "--save_dir", out,
                             "--device", "cpu", "--max_seq_len", 64, "--batch_size", 8, "--learning_rate", 5e-3,
                             "--lora_rank", 4, "--lora_alpha", 8, "--eval_interval", 0, "--max_steps", 3,
                             "--lora_variant", variant, *extra)]


def run(ws, out, variant, *extra):
    captured = {}
    real = train_lora.save_lora

    def spy(model, path, **kw):   # the live model at save time
        captured["model"] = model
        return real(model, path, **kw)

    train_lora.save_lora = spy
    try:
        metrics, log = quiet(train_lora.main, argv(ws, out, variant, *extra))
    finally:
        train_lora.save_lora = real
    return metrics, log, captured["model"]


@pytest.mark.parametrize("variant", OURS)
def test_variant_trains_and_its_file_loads_and_merges(ws, tmp_path, variant):
    out = tmp_path / "out"
    out.mkdir()
    (out / "full_sft_64.pth").write_bytes(ws["sft_ckpt"].read_bytes())
    extra = {"delta_lora": ["--delta_lora_start_step", 1], "lora_drop": ["--lora_drop_sample_ratio", 0.2]}
    metrics, log, live = run(ws, out, variant, *extra.get(variant, []))
    assert metrics["steps"] == 3
    obj = safe_load(out / "lora_identity_64.pth")
    assert obj["lora_config"]["variant"] == variant
    base_name = "full_sft"
    if variant == "delta_lora":
        assert obj["lora_config"]["options"]["base_weight"] == "lora_identity_delta_base"
        new_base = safe_load(out / "lora_identity_delta_base_64.pth")["model"]
        old_base = safe_load(out / "full_sft_64.pth")["model"]
        assert any(not torch.equal(new_base[k], old_base[k]) for k in old_base)   # W moved
        base_name = "lora_identity_delta_base"
        assert "every save writes the new base lora_identity_delta_base_64.pth" in log
    if variant == "lora_drop":
        assert "LoRA-drop:" in log and obj["lora_config"]["options"]["kept_layers"]
    model, _ = load_model(out / f"{base_name}_64.pth")
    load_lora(model, out / "lora_identity_64.pth")
    if variant == "lora_drop":   # loading shares the dropped layers' Parameters again
        layers = dict(lora_modules(model))
        for owner, users in obj["lora_config"]["options"]["shared_layers"].items():
            assert all(layers[u].lora_A["lora_identity"] is layers[owner].lora_A["lora_identity"] for u in users)
    x = torch.randint(3, 300, (2, 16))
    live.eval()
    with torch.no_grad():
        y = model(x).logits
        torch.testing.assert_close(y, live(x).logits, rtol=0, atol=1e-6)
        merge_lora(model)
        torch.testing.assert_close(model(x).logits, y, rtol=0, atol=1e-5)
    if variant == "delta_lora":   # scripts/merge_lora.py on the new base gives the trained model
        from scripts.merge_lora import main as merge_main

        path = quiet(merge_main, ["--weight", base_name, "--lora_weight", "lora_identity", "--save_dir", str(out),
                                  "--hidden_size", "64"])[0]
        with torch.no_grad():
            torch.testing.assert_close(load_model(path)[0](x).logits, y, rtol=0, atol=1e-5)


def test_lora_fa_keeps_A_and_delta_lora_file_refuses_the_old_base(ws, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "full_sft_64.pth").write_bytes(ws["sft_ckpt"].read_bytes())
    _, _, live = run(ws, out, "lora_fa")
    assert all(not m.lora_A["lora_identity"].requires_grad for _, m in lora_modules(live))
    run(ws, out, "delta_lora", "--delta_lora_start_step", 0, "--lora_name", "dl")
    model, _ = load_model(out / "full_sft_64.pth")
    with pytest.raises(TinyMindError, match="other base weights.*--weight dl_delta_base"):
        load_lora(model, out / "dl_64.pth")
    expect_user_error(capsys, train_lora.main, argv(ws, out, "delta_lora", "--lora_dropout", 0.1), "lora_dropout 0")
    expect_user_error(capsys, train_lora.main, argv(ws, out, "lora_plus", "--loraplus_lr_ratio", 0),
                      "loraplus_lr_ratio")


@pytest.mark.parametrize("variant", ["delta_lora", "lora_drop"])
def test_resume_is_exact(ws, tmp_path, monkeypatch, variant):
    """Delta-LoRA resumes on the new base saved with the resume file; LoRA-drop redoes its (seeded) stage 1."""
    from trainer import train_loop as loop

    extra = ["--max_steps", 6, "--save_interval", 3, "--delta_lora_start_step", 1, "--lora_drop_sample_ratio", 0.2]
    dirs = {}
    for name in ("straight", "cut"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "full_sft_64.pth").write_bytes(ws["sft_ckpt"].read_bytes())
    run(ws, dirs["straight"], variant, *extra)
    real = loop.lr_at

    def interrupt_at_3(step, *a):   # Ctrl-C just after the save at step 3
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_at", interrupt_at_3)
    with pytest.raises(SystemExit):
        run(ws, dirs["cut"], variant, *extra)
    monkeypatch.setattr(loop, "lr_at", real)
    _, log, _ = run(ws, dirs["cut"], variant, *extra, "--from_resume", 1)
    assert "at step 3/6" in log
    assert ("resuming on the changed base" in log) == (variant == "delta_lora")
    names = ["lora_identity_64.pth"] + (["lora_identity_delta_base_64.pth"] if variant == "delta_lora" else [])
    for f in names:
        a, b = safe_load(dirs["straight"] / f), safe_load(dirs["cut"] / f)
        assert_bitwise_equal(a.get("adapter", a.get("model")), b.get("adapter", b.get("model")))
