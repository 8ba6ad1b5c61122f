"""Every registered LoRA variant trains from trainer/train_lora.py, and its file works everywhere.

For each name in model/lora_variants: ``train_lora.py --lora_variant NAME --max_steps 3`` on a smoke
full_sft checkpoint; the adapter file says which variant made it; ``load_lora`` puts it on the untouched
base and reproduces the trained model (where the variant leaves W alone); ``scripts/merge_lora.py``
merges it into a plain checkpoint with the same logits; ``eval_llm.py --lora_weight`` answers with it.
"""
import pytest
import torch

import eval_llm

from model.common import safe_load
from model.lora_variants import variants
from model.model import load_model
from model.model_lora import adapter_names, base_state_dict, load_lora
from conftest import expect_user_error, quiet
from test_train_lora import lora_argv, with_base, ws  # noqa: F401 (ws: a pytest fixture)
from trainer import train_lora

# LoRA's own file on the fp32 base cannot reproduce a model whose base was not that base while training
BASE_DIFFERS = {"qlora"}   # NF4 base while training; the file is meant for the full-precision base


@pytest.mark.parametrize("name", list(variants()))
def test_variant_trains_three_steps_and_its_file_loads_and_merges(name, ws, tmp_path, monkeypatch):  # noqa: F811
    from scripts.merge_lora import main as merge_main

    out = with_base(ws, tmp_path)
    captured = {}
    real_save = train_lora.save_lora

    def spy(model, path, **kw):
        captured["model"] = model
        return real_save(model, path, **kw)

    monkeypatch.setattr(train_lora, "save_lora", spy)
    metrics, log = quiet(train_lora.main, lora_argv(ws, out, "--lora_variant", name, "--max_steps", 3,
                                                     "--lora_name", "adapter"))
    assert metrics["steps"] == 3 and f"variant {name}" in log
    saved = safe_load(out / "adapter_64.pth")
    cfg = saved["lora_config"]
    assert cfg["variant"] == name or cfg["options"].get("trained_as") == name   # residual inits: plain LoRA

    if variants()[name].save_extra is not None:   # W itself changed (Delta-LoRA): its own tests load that base
        return
    live = captured["model"].eval()
    model, _ = load_model(out / "full_sft_64.pth")
    assert load_lora(model, out / "adapter_64.pth") == "adapter" and adapter_names(model) == ("adapter",)
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = model(x).logits
        if name not in BASE_DIFFERS:
            torch.testing.assert_close(loaded, live(x).logits, rtol=0, atol=1e-5)

    merged_path = merge_main(["--weight", "full_sft", "--lora_weight", "adapter", "--save_dir", str(out),
                              "--hidden_size", "64"])
    merged, _ = load_model(merged_path)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, loaded, rtol=0, atol=1e-5)
    assert set(base_state_dict(model)) == set(merged.state_dict())

    for extra in ((), ("--merge",)):   # eval_llm.py takes the file with no variant flag, merged or not
        _, printed = quiet(eval_llm.main, ["--weight", "full_sft", "--lora_weight", "adapter", "--save_dir", str(out),
                                           "--tokenizer_path", ws["tok"], "--device", "cpu", "--dtype", "float32",
                                           "--prompt", "who are you?", "--max_new_tokens", "2", "--temperature", "0",
                                           *extra])


def test_variant_flags_are_grouped_and_checked(ws, tmp_path, capsys):  # noqa: F811
    text = train_lora.build_parser().format_help()
    for group in ("dora (arXiv 2402.09353)", "vera (arXiv 2310.11454)", "qlora (arXiv 2305.14314)",
                  "adalora (arXiv 2303.10512)", "--vera_rank", "--qlora_double_quant", "--adalora_target_r"):
        assert group in text, group
    out = with_base(ws, tmp_path)
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--lora_variant", "vera", "--use_rslora", 1),
                      "does not apply to VeRA")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--lora_variant", "adalora",
                                                         "--adalora_target_r", 20), "adalora_target_r")
    assert not list(out.glob("lora_identity*"))   # nothing written


@pytest.mark.parametrize("name", ["adalora", "pissa"])
def test_variant_resume_is_exact(name, ws, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C at step 5 of 8, then --from_resume 1: the same adapter file as a straight run (AdaLoRA's
    scores and masks travel in the resume file as hook state; PiSSA's residual base is recomputed)."""
    from conftest import assert_bitwise_equal
    from trainer import train_loop

    argv = ["--lora_variant", name, "--max_steps", 8, "--adalora_tinit", 1, "--adalora_tfinal", 3]
    straight, cut = with_base(ws, tmp_path, "straight"), with_base(ws, tmp_path, "cut")
    quiet(train_lora.main, lora_argv(ws, straight, *argv))
    real = train_loop.lr_at

    def interrupt_at_5(step, *a):
        if step == 5:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train_loop, "lr_at", interrupt_at_5)
    with pytest.raises(SystemExit):
        quiet(train_lora.main, lora_argv(ws, cut, *argv))
    monkeypatch.setattr(train_loop, "lr_at", real)
    _, log = quiet(train_lora.main, lora_argv(ws, cut, *argv, "--from_resume", 1))
    assert "at step 5/8" in log
    assert_bitwise_equal(safe_load(straight / "lora_identity_64.pth")["adapter"],
                         safe_load(cut / "lora_identity_64.pth")["adapter"])


def test_adapter_trained_over_another_needs_it(ws, tmp_path, capsys):  # noqa: F811
    """--lora_over loads companions first; the new file records them and refuses to load alone."""
    from model.common import TinyMindError

    out = with_base(ws, tmp_path)
    quiet(train_lora.main, lora_argv(ws, out, "--lora_variant", "dora", "--max_steps", 2, "--lora_name", "first"))
    quiet(train_lora.main, lora_argv(ws, out, "--max_steps", 2, "--lora_name", "second", "--lora_over", "first"))
    saved = safe_load(out / "second_64.pth")
    assert [o["name"] for o in saved["trained_over"]] == ["first"]
    model, _ = load_model(out / "full_sft_64.pth")
    with pytest.raises(TinyMindError, match="trained on top of adapter 'first'"):
        load_lora(model, out / "second_64.pth")
    load_lora(model, out / "first_64.pth")
    load_lora(model, out / "second_64.pth")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--max_steps", 2, "--lora_name", "third",
                                                         "--lora_over", "nope"), "nope_64.pth")
