"""Every registered LoRA variant trains from trainer/train_lora.py, and its file works everywhere.

For each name in model/lora_variants, ONE ``train_lora.py --lora_variant NAME --max_steps 3`` run on a smoke
full_sft checkpoint (the module fixture ``trained`` makes it on first use and keeps it), which every test
below reads:

- the adapter file says which variant made it; ``load_lora`` puts it on its base (the untouched full_sft, or
  the new base Delta-LoRA wrote) and reproduces the trained model; merging it in memory and with
  ``scripts/merge_lora.py`` gives the same logits; ``eval_llm.py --lora_weight`` answers with it, the same
  merged or not;
- what only some variants do: Delta-LoRA moves W, writes the new base and its file refuses the old one;
  LoRA-drop's file lists its kept and shared layers and loading shares them again; LoRA-FA's A stays frozen.

Then exact resume for the variants that carry state across an interruption, adapters trained over others,
and the variant flags.
"""
import pytest
import torch

import eval_llm
from conftest import assert_bitwise_equal, expect_user_error, lora_argv, quiet, run_interrupted, with_base
from model.common import TinyMindError, safe_load
from model.lora_variants import variants
from model.model import load_model
from model.model_lora import adapter_names, base_state_dict, load_lora, lora_modules, merge_lora
from scripts.merge_lora import main as merge_main
from trainer import train_lora

# LoRA's own file on the fp32 base cannot reproduce a model whose base was not that base while training
BASE_DIFFERS = {"qlora"}   # NF4 base while training; the file is meant for the full-precision base
# Flags that make a 3-step run show the variant's effect: Delta-LoRA moves W from step 1 on, and LoRA-drop
# trains its stage 1 on a fifth of the data
VARIANT_FLAGS = {"delta_lora": ["--delta_lora_start_step", 1], "lora_drop": ["--lora_drop_sample_ratio", 0.2]}
X = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def train(ws, out, *extra):
    """train_lora.py into ``out``; returns (metrics, log, the live model as it was when its file was saved)."""
    captured = {}
    real_save = train_lora.save_lora

    def spy(model, path, **kw):
        captured["model"] = model
        return real_save(model, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lora, "save_lora", spy)
        metrics, log = quiet(train_lora.main, lora_argv(ws, out, *extra))
    return metrics, log, captured["model"]


@pytest.fixture(scope="module")
def trained(ws, tmp_path_factory):
    """``trained(name)``: the 3-step run of variant ``name`` (adapter 'adapter'), made once per module.
    Returns a dict: out (its save_dir), metrics, log, live (the trained model), file (the adapter file)."""
    runs = {}

    def get(name):
        if name not in runs:
            out = with_base(ws, tmp_path_factory.mktemp(name))
            metrics, log, live = train(ws, out, "--lora_variant", name, "--max_steps", 3, "--lora_name", "adapter",
                                       *VARIANT_FLAGS.get(name, []))
            runs[name] = {"out": out, "metrics": metrics, "log": log, "live": live.eval(),
                          "file": safe_load(out / "adapter_64.pth")}
        return runs[name]
    return get


def base_weight(run):
    """The checkpoint the adapter belongs on: Delta-LoRA names the new base it wrote, the others full_sft."""
    return run["file"]["lora_config"]["options"].get("base_weight", "full_sft")


@pytest.mark.slow   # trains
@pytest.mark.parametrize("name", list(variants()))
def test_variant_trains_three_steps_and_its_file_loads_and_merges(name, trained, ws):
    run = trained(name)
    out, cfg = run["out"], run["file"]["lora_config"]
    assert run["metrics"]["steps"] == 3 and f"variant {name}" in run["log"]
    assert cfg["variant"] == name or cfg["options"].get("trained_as") == name   # residual inits: plain LoRA
    assert (variants()[name].save_extra is not None) == (base_weight(run) != "full_sft")

    model, _ = load_model(out / f"{base_weight(run)}_64.pth")
    assert load_lora(model, out / "adapter_64.pth") == "adapter" and adapter_names(model) == ("adapter",)
    with torch.no_grad():
        loaded = model(X).logits
        if name not in BASE_DIFFERS:
            torch.testing.assert_close(loaded, run["live"](X).logits, rtol=0, atol=1e-6)

    merged_path = quiet(merge_main, ["--weight", base_weight(run), "--lora_weight", "adapter", "--save_dir", str(out),
                                     "--hidden_size", "64"])[0]
    merged, _ = load_model(merged_path)
    assert set(base_state_dict(model)) == set(merged.state_dict())
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, loaded, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(X).logits, loaded, rtol=0, atol=1e-5)

    replies = []
    for extra in ((), ("--merge",)):   # eval_llm.py takes the file with no variant flag, merged or not
        _, printed = quiet(eval_llm.main, ["--weight", base_weight(run), "--lora_weight", "adapter",
                                           "--save_dir", str(out), "--tokenizer_path", ws["tok"], "--device", "cpu",
                                           "--dtype", "float32", "--prompt", "who are you?", "--max_new_tokens", "2",
                                           "--temperature", "0", *extra])
        replies.append(printed)
    assert replies[0].endswith("\n") and replies[0] == replies[1]


@pytest.mark.slow   # trains
def test_delta_lora_writes_its_base_and_its_file_refuses_the_old_one(trained):
    run = trained("delta_lora")
    out = run["out"]
    assert base_weight(run) == "adapter_delta_base"
    assert "every save writes the new base adapter_delta_base_64.pth" in run["log"]
    new_base = safe_load(out / "adapter_delta_base_64.pth")["model"]
    old_base = safe_load(out / "full_sft_64.pth")["model"]
    assert any(not torch.equal(new_base[k], old_base[k]) for k in old_base)   # W moved
    model, _ = load_model(out / "full_sft_64.pth")
    with pytest.raises(TinyMindError, match="other base weights.*--weight adapter_delta_base"):
        load_lora(model, out / "adapter_64.pth")


@pytest.mark.slow   # trains
def test_lora_drop_file_lists_its_layers_and_loading_shares_them(trained):
    run = trained("lora_drop")
    options = run["file"]["lora_config"]["options"]
    assert "LoRA-drop:" in run["log"] and options["kept_layers"] and options["shared_layers"]
    model, _ = load_model(run["out"] / "full_sft_64.pth")
    load_lora(model, run["out"] / "adapter_64.pth")
    layers = dict(lora_modules(model))
    for owner, users in options["shared_layers"].items():   # the dropped layers hold the owner's Parameters
        assert all(layers[u].lora_A["adapter"] is layers[owner].lora_A["adapter"] for u in users)
        assert all(layers[u].lora_B["adapter"] is layers[owner].lora_B["adapter"] for u in users)


@pytest.mark.slow   # trains
def test_lora_fa_keeps_A_frozen(trained):
    assert all(not m.lora_A["adapter"].requires_grad for _, m in lora_modules(trained("lora_fa")["live"]))


# Ctrl-C at step `stop` of the run, then --from_resume 1: AdaLoRA's scores and masks travel in the resume file
# as hook state; PiSSA's residual base is recomputed; Delta-LoRA resumes on the new base saved with the resume
# file (the Ctrl-C comes just after the save at step 3); LoRA-drop redoes its (seeded) stage 1.
RESUME = {"adalora": (5, ["--max_steps", 8, "--adalora_tinit", 1, "--adalora_tfinal", 3]),
          "pissa": (5, ["--max_steps", 8]),
          "delta_lora": (3, ["--max_steps", 6, "--save_interval", 3, "--delta_lora_start_step", 1]),
          "lora_drop": (3, ["--max_steps", 6, "--save_interval", 3, "--lora_drop_sample_ratio", 0.2])}


@pytest.mark.slow   # trains
@pytest.mark.parametrize("name", list(RESUME))
def test_variant_resume_is_exact(name, ws, tmp_path, monkeypatch):
    stop, extra = RESUME[name]
    argv = ["--lora_variant", name, *extra]
    straight, cut = with_base(ws, tmp_path, "straight"), with_base(ws, tmp_path, "cut")
    quiet(train_lora.main, lora_argv(ws, straight, *argv))
    run_interrupted(monkeypatch, stop, train_lora.main, lora_argv(ws, cut, *argv))
    _, log = quiet(train_lora.main, lora_argv(ws, cut, *argv, "--from_resume", 1))
    assert f"at step {stop}/{extra[1]}" in log
    assert ("resuming on the changed base" in log) == (name == "delta_lora")
    files = ["lora_identity_64.pth"] + (["lora_identity_delta_base_64.pth"] if name == "delta_lora" else [])
    for f in files:
        a, b = safe_load(straight / f), safe_load(cut / f)
        assert_bitwise_equal(a.get("adapter", a.get("model")), b.get("adapter", b.get("model")))


@pytest.mark.slow   # trains
def test_adapter_trained_over_another_needs_it(ws, tmp_path, capsys):
    """--lora_over loads companions first; the new file records them and refuses to load alone."""
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


def test_variant_flags_are_grouped_and_checked(ws, tmp_path, capsys):
    text = train_lora.build_parser().format_help()
    for group in ("dora (arXiv 2402.09353)", "vera (arXiv 2310.11454)", "qlora (arXiv 2305.14314)",
                  "adalora (arXiv 2303.10512)", "--vera_rank", "--qlora_double_quant", "--adalora_target_r"):
        assert group in text, group
    out = with_base(ws, tmp_path)
    for argv, needle in ((("--lora_variant", "vera", "--use_rslora", 1), "does not apply to VeRA"),
                         (("--lora_variant", "adalora", "--adalora_target_r", 20), "adalora_target_r"),
                         (("--lora_variant", "delta_lora", "--lora_dropout", 0.1), "lora_dropout 0"),
                         (("--lora_variant", "lora_plus", "--loraplus_lr_ratio", 0), "loraplus_lr_ratio")):
        expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--max_steps", 3, *argv), needle)
    assert sorted(p.name for p in out.iterdir()) == ["full_sft_64.pth"]   # nothing written
