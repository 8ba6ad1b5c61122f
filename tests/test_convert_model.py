"""scripts/convert_model.py: every direction round-trips exactly, the exported folders give TinyMind's logits,
prompt and text in transformers / PEFT, MiniMind files import, and every bad input is one line + exit 2.

Models are the `smoke` preset with random norms (a dropped or misplaced norm changes the logits); the
MiniMind files are built here from TinyMind models with MiniMind's key names. Tests that load the folders
in transformers or peft skip where those are not installed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise_equal, build_model, expect_user_error, logits, randomize_lora_B
from safetensors.torch import load_file, save_file

from model.model import TinyMindForCausalLM, get_config, load_model, save_model
from model.model_lora import LoRAConfig, apply_lora, load_lora, save_lora
from model.tokenizer import CHAT_TEMPLATE_JINJA, load_tokenizer
from scripts.convert_model import main

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 6400, (2, 13), generator=torch.Generator().manual_seed(0))
MESSAGES = [{"role": "system", "content": "你是 TinyMind"}, {"role": "user", "content": "你好!\nhi"},
            {"role": "assistant", "content": "你好"}, {"role": "user", "content": "感冒怎么办？"}]


def random_model(qk_norm=False, seed=0, **overrides) -> TinyMindForCausalLM:
    model = build_model(seed, qk_norm=qk_norm, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_base(out: Path, qk_norm=False, name="full_sft") -> TinyMindForCausalLM:
    model = random_model(qk_norm)
    save_model(model, out / f"{name}_64.pth", stage="sft")
    return model


def save_adapter(model, out: Path, name="lora_identity", **cfg) -> TinyMindForCausalLM:
    """A LoRA with alpha != r and non-zero B (a zero B would hide a wrong mapping)."""
    apply_lora(model, LoRAConfig(**{"rank": 4, "alpha": 6.0, **cfg}), adapter_name=name)
    randomize_lora_B(model, name)   # and an embedding's A, which starts at zero too
    save_lora(model, out / f"{name}_64.pth", adapter_name=name)
    return model


def convert(out: Path, *argv):
    return main([*map(str, argv), "--save_dir", str(out)])


def refused(capsys, argv, match):
    """The command exits with status 2 and one line 'error: ...' containing ``match``."""
    expect_user_error(capsys, main, [str(a) for a in argv], match)


def load_hf(transformers, folder: Path, arch: str):
    if not hasattr(transformers, arch):   # Qwen3 arrived in transformers 4.51
        pytest.skip(f"this transformers has no {arch}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    assert type(model).__name__ == arch
    return model


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


# ----------------------------------------------------------------------------- TinyMind <-> transformers

def test_hf_round_trip_is_bit_exact(out, tmp_path):
    save_base(out)
    hf = tmp_path / "hf"
    convert(out, "--weight", "full_sft", "--to", "hf", "--out", hf)
    names = {p.name for p in hf.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(hf / "model.safetensors")   # tied: stored once, as transformers does
    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE_JINJA
    convert(out, "--from", "hf", "--in", hf, "--weight", "from_hf")
    a, b = torch.load(out / "full_sft_64.pth"), torch.load(out / "from_hf_64.pth")
    assert a["config"] == b["config"] and b["stage"] == "sft"
    assert_bitwise_equal(a["model"], b["model"])


@pytest.mark.slow   # loads and runs transformers
def test_transformers_gives_tinymind_logits_prompt_and_text(out, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = save_base(out)
    convert(out, "--weight", "full_sft", "--to", "hf", "--out", tmp_path / "hf")
    hf = load_hf(transformers, tmp_path / "hf", "LlamaForCausalLM")
    assert torch.allclose(logits(hf, IDS), logits(model, IDS), atol=1e-4)
    tok, mine = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf"), load_tokenizer()
    for msgs, gen in ((MESSAGES, True), (MESSAGES[:3], False)):
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert prompt == mine.apply_chat_template(msgs, add_generation_prompt=gen)
        assert tok(prompt)["input_ids"] == mine.encode(prompt)
    ids = torch.tensor([mine.encode(mine.apply_chat_template(MESSAGES, add_generation_prompt=True))])
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    ours = model.generate(ids, max_new_tokens=12, temperature=0)[0, ids.shape[1]:]
    assert theirs.tolist() == ours.tolist()
    assert tok.decode(theirs, skip_special_tokens=True) == mine.decode(ours)


def test_qk_norm_model_exports_as_qwen3_and_back(out, tmp_path, capsys):
    model = save_base(out, qk_norm=True)
    refused(capsys, ["--weight", "full_sft", "--to", "hf", "--arch", "llama", "--out", tmp_path / "x",
                     "--save_dir", out], "qk_norm")
    convert(out, "--weight", "full_sft", "--to", "hf", "--out", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    convert(out, "--from", "hf", "--in", tmp_path / "hf", "--weight", "back")
    back, _ = load_model(out / "back_64.pth")
    assert back.config.qk_norm and torch.equal(logits(back, IDS), logits(model, IDS))
    transformers = pytest.importorskip("transformers")
    hf = load_hf(transformers, tmp_path / "hf", "Qwen3ForCausalLM")
    assert torch.allclose(logits(hf, IDS), logits(model, IDS), atol=1e-4)


def test_merged_lora_export(out, tmp_path):
    model = save_adapter(save_base(out), out)
    convert(out, "--weight", "full_sft", "--lora_weight", "lora_identity", "--to", "hf", "--out", tmp_path / "hf")
    convert(out, "--from", "hf", "--in", tmp_path / "hf", "--weight", "merged")
    merged, _ = load_model(out / "merged_64.pth")
    assert torch.allclose(logits(merged, IDS), logits(model, IDS), atol=1e-5)


# ----------------------------------------------------------------------------- LoRA <-> PEFT

@pytest.mark.parametrize("cfg", [dict(use_rslora=True),                      # all seven layer kinds
                                 dict(targets="q_proj,v_proj,up_proj"),       # a subset, by suffix
                                 dict(targets="embed_tokens,v_proj"),         # the token embedding too
                                 dict(targets=r"re:model\.layers\.0\..*")])   # layer 0 only: full names
def test_lora_peft_round_trip_is_exact(out, tmp_path, cfg):
    save_adapter(save_base(out), out, **cfg)
    convert(out, "--weight", "full_sft", "--lora_weight", "lora_identity", "--to", "peft", "--out", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 6.0 and config["use_rslora"] == cfg.get("use_rslora", False)
    convert(out, "--from", "peft", "--in", tmp_path / "peft", "--weight", "full_sft", "--lora_name", "back")
    a, b = torch.load(out / "lora_identity_64.pth"), torch.load(out / "back_64.pth")
    a_cfg, b_cfg = dict(a["lora_config"]), dict(b["lora_config"])
    if cfg.get("targets", "").startswith("re:"):   # a regex comes back as the module names it selected
        assert b_cfg.pop("targets").split(",")[0] == "model.layers.0.self_attn.q_proj"
        a_cfg.pop("targets")
    assert a_cfg == b_cfg and a["base_fingerprint"] == b["base_fingerprint"]
    assert list(a["adapter"]) == list(b["adapter"])
    assert_bitwise_equal(a["adapter"], b["adapter"])


def test_peft_model_gives_tinymind_logits(out, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_adapter(save_base(out), out, use_rslora=True, targets="all-linear")
    save_adapter(random_model(), out, name="lora_medical", targets="embed_tokens,down_proj")   # its own file
    model = random_model()                                                      # TinyMind with both active
    for name in ("lora_identity", "lora_medical"):
        load_lora(model, out / f"{name}_64.pth")
    convert(out, "--weight", "full_sft", "--to", "hf", "--out", tmp_path / "hf")
    convert(out, "--weight", "full_sft", "--lora_weight", "lora_identity", "--to", "peft", "--out", tmp_path / "peft")
    hf = load_hf(transformers, tmp_path / "hf", "LlamaForCausalLM")
    convert(out, "--weight", "full_sft", "--lora_weight", "lora_medical", "--to", "peft", "--out", tmp_path / "med")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft", adapter_name="identity").eval()
    peft_model.load_adapter(tmp_path / "med", adapter_name="medical")
    peft_model.base_model.set_adapter(["identity", "medical"])
    assert torch.allclose(logits(peft_model, IDS), logits(model, IDS), atol=1e-4)


# ----------------------------------------------------------------------------- MiniMind -> TinyMind

def minimind_state_dict(model) -> dict:
    """What MiniMind's trainers save: the bare state dict (tied head included), in fp16."""
    return {k: v.half() for k, v in model.state_dict().items()}


def fp16_exact(model):
    """Round the weights through fp16 so the imported (fp16 -> fp32) model must match bit for bit."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("qk_norm", [False, True])
def test_minimind_state_dict_imports_with_the_original_logits(out, tmp_path, qk_norm):
    overrides = dict(intermediate_size=128, rms_norm_eps=1e-6) if qk_norm else {}
    model = fp16_exact(random_model(qk_norm, **overrides))
    torch.save(minimind_state_dict(model), tmp_path / "full_sft_64.pth")
    if qk_norm:   # minimind-3's preset, shrunk by the flags
        flags = ["--preset", "minimind3", "--hidden_size", 64, "--num_hidden_layers", 2, "--num_attention_heads", 4,
                 "--num_key_value_heads", 2, "--intermediate_size", 128, "--max_position_embeddings", 512]
    else:         # no preset: the flags, MiniMind's defaults for the rest
        flags = ["--hidden_size", 64, "--num_hidden_layers", 2, "--num_attention_heads", 4, "--num_key_value_heads", 2]
    convert(out, "--from", "minimind", "--in", tmp_path / "full_sft_64.pth", "--weight", "mm_sft", *flags)
    mm, ckpt = load_model(out / "mm_sft_64.pth")
    assert ckpt["stage"] == "sft" and mm.config.qk_norm == qk_norm
    assert torch.equal(logits(mm, IDS), logits(model, IDS))


def test_minimind_lora_imports_with_scaling_one(out, tmp_path):
    model = fp16_exact(random_model())
    torch.save(minimind_state_dict(model), tmp_path / "full_sft_64.pth")
    convert(out, "--from", "minimind", "--in", tmp_path / "full_sft_64.pth", "--weight", "mm_sft", "--preset", "smoke")
    # MiniMind's LoRA: square layers (q_proj, o_proj), y = W x + B(A x), keys <module>.lora.A.weight
    torch.manual_seed(2)
    lora, reference = {}, fp16_exact(random_model())
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.o_proj"):
            module = f"model.layers.{i}.{name}"
            A, B = torch.randn(3, 64) * 0.1, torch.randn(64, 3) * 0.1
            lora[f"{module}.lora.A.weight"], lora[f"{module}.lora.B.weight"] = A.half(), B.half()
            with torch.no_grad():
                reference.get_submodule(module).weight += B.half().float() @ A.half().float()
    torch.save(lora, tmp_path / "lora_medical_64.pth")
    convert(out, "--from", "minimind", "--in", tmp_path / "lora_medical_64.pth", "--weight", "mm_sft",
            "--lora_name", "mm_medical")
    obj = torch.load(out / "mm_medical_64.pth")
    assert obj["lora_config"]["rank"] == 3 and obj["lora_config"]["alpha"] == 3.0
    assert obj["lora_config"]["targets"] == "q_proj,o_proj"
    mm, _ = load_model(out / "mm_sft_64.pth")
    load_lora(mm, out / "mm_medical_64.pth")
    assert torch.allclose(logits(mm, IDS), logits(reference, IDS), atol=1e-5)


def test_minimind3_preset_matches_minimind3():
    cfg = get_config("minimind3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (768, 8, 8, 4)
    assert cfg.intermediate_size == 2432 and cfg.rms_norm_eps == 1e-6 and cfg.qk_norm and cfg.tie_word_embeddings


# ----------------------------------------------------------------------------- refusals: one line, exit 2

def test_refusals_of_transformers_folders(out, tmp_path, capsys):
    save_base(out)
    hf = tmp_path / "hf"
    convert(out, "--weight", "full_sft", "--to", "hf", "--out", hf)
    good = json.loads((hf / "config.json").read_text())
    cmd = ["--from", "hf", "--in", hf, "--weight", "x", "--save_dir", out]
    for change, match in (({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope scaling 'yarn'"),
                          ({"head_dim": 32}, "q_proj.weight has shape (64, 64), expected (128, 64)")):
        (hf / "config.json").write_text(json.dumps({**good, **change}))
        refused(capsys, cmd, match)
    (hf / "config.json").write_text(json.dumps(good))
    weights = load_file(hf / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, hf / "model.safetensors",
              metadata={"format": "pt"})
    refused(capsys, cmd, "missing tensor(s): model.layers.1.mlp.up_proj.weight")
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, hf / "model.safetensors",
              metadata={"format": "pt"})
    refused(capsys, cmd, "unknown tensor(s): model.layers.0.self_attn.q_proj.bias")
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    refused(capsys, cmd, "not a readable safetensors file")
    refused(capsys, ["--from", "hf", "--in", tmp_path / "nowhere", "--weight", "x"], "not found")
    refused(capsys, ["--from", "hf", "--in", hf, "--save_dir", out], "full_sft_64.pth exists")   # default --weight
    refused(capsys, ["--from", "hf", "--weight", "x"], "--in")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    refused(capsys, ["--weight", "full_sft", "--to", "hf", "--out", tmp_path / "busy", "--save_dir", out], "non-empty")


def test_refusals_of_lora_and_peft_files(out, tmp_path, capsys):
    save_adapter(save_base(out), out)
    refused(capsys, ["--weight", "full_sft", "--to", "peft", "--save_dir", out], "--lora_weight")
    refused(capsys, ["--weight", "full_sft", "--lora_weight", "full_sft", "--to", "peft", "--save_dir", out],
            "not a TinyMind LoRA file")
    obj = torch.load(out / "lora_identity_64.pth")
    obj["lora_config"]["variant"] = "vera"
    torch.save(obj, out / "lora_vera_64.pth")
    refused(capsys, ["--weight", "full_sft", "--lora_weight", "lora_vera", "--to", "peft", "--out", tmp_path / "v",
                     "--save_dir", out], "variant 'vera'")
    assert not (tmp_path / "v").exists()
    peft_dir = tmp_path / "peft"
    convert(out, "--weight", "full_sft", "--lora_weight", "lora_identity", "--to", "peft", "--out", peft_dir)
    good = json.loads((peft_dir / "adapter_config.json").read_text())
    cmd = ["--from", "peft", "--in", peft_dir, "--weight", "full_sft", "--lora_name", "x", "--save_dir", out]
    for change, match in (({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "IA3"),
                          ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"bias": "all"}, "bias")):
        (peft_dir / "adapter_config.json").write_text(json.dumps({**good, **change}))
        refused(capsys, cmd, match)
    (peft_dir / "adapter_config.json").write_text(json.dumps(good))
    refused(capsys, cmd[:-4] + ["--save_dir", out], "--lora_name")
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
              peft_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    refused(capsys, cmd, "lora_magnitude_vector")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_refusals_of_minimind_files(out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    refused(capsys, ["--from", "minimind", "--in", tmp_path / "evil.pth", "--preset", "smoke", "--save_dir", out],
            "not a readable MiniMind weight file")
    assert not (tmp_path / "pwned").exists()
    state = minimind_state_dict(random_model())
    path = tmp_path / "full_sft_64.pth"
    cmd = ["--from", "minimind", "--in", path, "--weight", "mm", "--save_dir", out]
    torch.save(state, path)
    refused(capsys, cmd, "--preset")                                    # no config in the file
    refused(capsys, cmd + ["--preset", "small"], "looks like: hidden 64, vocab 6400, 2 layers")
    torch.save({**state, "model.layers.0.mlp.experts.0.up_proj.weight": torch.zeros(1)}, path)
    refused(capsys, cmd + ["--preset", "smoke"], "MoE")
    torch.save({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path)
    refused(capsys, cmd + ["--preset", "smoke"], "unknown tensor(s): model.layers.0.self_attn.q_proj.bias")
    torch.save({k: v for k, v in state.items() if "layers.1.mlp.down_proj" not in k}, path)
    refused(capsys, cmd + ["--preset", "smoke"], "missing tensor(s): model.layers.1.mlp.down_proj.weight")
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, path)
    refused(capsys, cmd + ["--preset", "smoke"], "first MiniMind release")
    torch.save({"model.layers.0.self_attn.q_proj.lora.A.weight": torch.zeros(2, 64)}, path)
    refused(capsys, cmd + ["--lora_name", "lm"], "only one of")
    assert not out.exists() or not list(out.glob("mm*"))


@pytest.mark.slow   # subprocesses
def test_cli_runs_from_its_own_folder_and_fails_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "convert_model.py", "--from", "minimind", "--in", str(tmp_path / "no.pth")],
                       cwd=ROOT / "scripts", capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
