"""dev/bench.py: the --quick run measures everything and writes it to JSON; flags and targets are checked."""
import json
import math

import pytest
import torch

from model.common import TinyMindError
from model.model import get_config
from conftest import dev_script

bench = dev_script("bench")


@pytest.mark.slow   # times every measurement of the quick bench
def test_quick_bench_writes_every_measurement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))

    assert data["format"] == "tinymind-bench" and data["date"] and "--quick" in data["command"]
    machine = data["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu_count"] >= 1 and machine["device"] == "cpu"
    assert machine["platform"]

    assert list(data["measurements"]) == list(bench.MEASUREMENTS)
    for name, m in data["measurements"].items():
        if name == "train_compile":   # compiling takes a minute per model: --quick says so instead of timing
            assert not m["rows"] and "not measured with --quick" in m["details"]["skipped"]
            continue
        assert m["rows"], name
        for r in m["rows"]:
            assert math.isfinite(r["value"]) and r["value"] > 0, (name, r)
            assert r["status"] in ("not judged (quick)", "-"), (name, r)  # quick mode never judges targets
    names = [r["name"] for r in data["rows"]]
    assert {"decode", "decode_bf16", "train_smoke", "train_tiny"} <= set(names)

    d = data["measurements"]
    assert d["kv_cache"]["details"]["tokens_identical"]  # the two decodes timed did the same work
    assert d["merged_forward"]["details"]["merged_vs_unmerged_max_abs_diff"] < 1e-4
    assert 0 < d["packing"]["details"]["padded_fill"] <= 1
    mem = d["lora_memory"]["details"]
    assert mem["full"]["peak_mb"] >= mem["full"]["after_model_mb"] >= mem["full"]["before_model_mb"] > 0

    dec = d["decode"]["details"]
    for dtype in ("fp32", "bf16"):   # % of limit = measured tok/s / (mv bytes/s / bytes per token)
        lim = dec[f"{dtype}_limit"]
        assert lim["mv_bytes_per_s"] > 0 and lim["bytes_per_token"] > 0
        row = next(r for r in data["rows"] if r["name"] == ("decode" if dtype == "fp32" else "decode_bf16"))
        assert row["unit"] == "% of limit"
        assert row["value"] == pytest.approx(100 * dec[f"{dtype}_tok_s"] / lim["limit_tok_s"])
    assert dec["bf16_limit"]["bytes_per_token"] * 2 == dec["fp32_limit"]["bytes_per_token"]

    # the GEMM rate per dtype, and the step's FLOP rate as a share of it; each says which bf16 path ran
    assert {"gemm_rate_fp32", "gemm_rate_bf16", "train_flop_share_fp32", "train_flop_share_bf16"} <= set(names)
    path = "no native bf16 ("   # conftest: every test sees a CPU without native bf16
    for name in ("gemm_rate", "train_flop_share"):
        assert d[name]["details"]["bf16_path"].startswith(path)
        assert path in next(r for r in data["rows"] if r["name"] == f"{name}_bf16")["result"]
    share = d["train_flop_share"]["details"]
    assert share["preset"] == "smoke"
    assert share["flops_per_token"] == bench.step_flops_per_token(get_config("smoke"), 64)
    for dtype in ("fp32", "bf16"):
        row = next(r for r in data["rows"] if r["name"] == f"train_flop_share_{dtype}")
        assert row["value"] == pytest.approx(100 * share[dtype]["step_gflop_s"] / share[dtype]["gemm_gflop_s"])
        assert d["gemm_rate"]["details"][dtype]["mix_gflop_s"] > 0
    assert machine["cpu_bf16"].startswith(path)

    printed = capsys.readouterr().out
    assert "| measurement | result | % of limit | target | status |" in printed and str(out) in printed

    # --render prints the saved table again, with machine, command and date, and measures nothing
    rendered = bench.main(["--render", str(out)])
    assert rendered == bench.render_report(data) and data["table"] in rendered
    assert data["command"] in rendered and data["date"] in rendered and data["machine"]["cpu"] in rendered
    assert capsys.readouterr().out.strip() == rendered.strip()


def test_decode_bytes_per_token_counts_every_matrix_once():
    """Linear weights of the blocks + the LM head (the tied embedding read once, as the head) + one embedding row."""
    from model.model import TinyMindForCausalLM, get_config

    cfg = get_config("small")
    model = TinyMindForCausalLM(cfg)
    C, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = C // cfg.num_attention_heads * cfg.num_key_value_heads
    per_layer = C * C * 2 + 2 * C * kv + 3 * C * I
    assert bench.decode_bytes_per_token(model) == 4 * (L * per_layer + V * C + C)
    assert bench.decode_bytes_per_token(model.to(torch.bfloat16)) == 2 * (L * per_layer + V * C + C)
    assert bench.decode_bytes_per_token(model.float()) == pytest.approx(4 * 25.83e6, rel=0.01)


def test_lora_forward_matches_reference_formula():
    """LoRALinear computes s * (x A^T) @ B^T (a faster backward for CPU BLAS): values and grads equal the textbook
    base(x) + s * B(A(x)), with alpha != r so the scaling is not a power of two."""
    from model.model_lora import LoRAConfig, LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40, bias=False).double())  # float64: only real differences show
    layer.add_adapter("default", LoRAConfig(rank=4, alpha=7.0))
    layer.active = ("default",)
    torch.nn.init.normal_(layer.lora_B["default"], std=0.1)
    A, B, W, s = layer.lora_A["default"], layer.lora_B["default"], layer.base.weight, layer.scaling["default"]
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 40, dtype=torch.float64)

    y = layer(x)
    grads = torch.autograd.grad(y, (x, A, B, W), g)
    ref = x @ W.t() + s * torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)
    ref_grads = torch.autograd.grad(ref, (x, A, B, W), g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert B.grad is None and grads[2].shape == B.shape


def test_step_flops_count_every_linear_weight_once():
    """6 N per token over the weights of every nn.Linear (the tied head once) + 12 L T C for attention."""
    from model.model import TinyMindForCausalLM

    for preset in ("smoke", "tiny", "small"):
        cfg = get_config(preset)
        with torch.device("meta"):
            model = TinyMindForCausalLM(cfg)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        attention = 12 * cfg.num_hidden_layers * 256 * cfg.hidden_size
        assert bench.step_flops_per_token(cfg, 256) == 6 * linear + attention
        shapes = bench.linear_shapes(cfg)
        assert sum(uses for *_, uses in shapes) == 7 * cfg.num_hidden_layers + 1   # 7 linears a block + head


def test_render_tolerates_results_saved_before_the_flop_rows(tmp_path):
    """A result JSON without the gemm/FLOP rows and without machine.cpu_bf16 (the committed one) still renders."""
    report = {"format": "tinymind-bench", "date": "2025-01-01", "command": "python dev/bench.py",
              "machine": {"cpu": "Some CPU", "cpu_count": 2},
              "rows": [{"name": "kv_cache", "what": "kv", "value": 6.0, "unit": "x", "result": "6.0x",
                        "target": ">= 5x", "status": "PASS"}]}
    text = bench.render_report(report)
    assert "| kv | 6.0x |  | >= 5x | PASS |" in text and "Machine: Some CPU x2," in text and "bf16" not in text
    report["machine"]["cpu_bf16"] = "native bf16 (avx512_bf16)"
    assert "Machine: Some CPU (native bf16 (avx512_bf16)) x2," in bench.render_report(report)


def test_judge_targets():
    assert bench.judge("lora_step", 1.31, quick=False) == (">= 1.3x", "PASS")
    assert bench.judge("lora_step", 1.29, quick=False)[1] == "MISS"
    assert bench.judge("lora_memory", 0.69, quick=False)[1] == "PASS"
    assert bench.judge("merged_forward", 0.98, quick=False)[1] == "PASS"
    assert bench.judge("merged_forward", 1.04, quick=False)[1] == "MISS"
    assert bench.judge("decode", 59.0, quick=False) == (">= 60% of limit", "MISS")
    assert bench.judge("decode_bf16", 61.0, quick=False) == (">= 60% of limit", "PASS")
    assert bench.judge("unmerged_forward", 1.12, quick=False) == ("<= 1.1x", "MISS")
    assert bench.judge("train_tiny", 5.0, quick=False) == ("reported", "-")
    assert bench.judge("kv_cache", 2.0, quick=True)[1] == "not judged (quick)"


def test_bad_flags_are_one_line_errors():
    with pytest.raises(TinyMindError, match="unknown measurement.*choose from"):
        bench.main(["--only", "decode,nope"])
    with pytest.raises(TinyMindError, match="unknown preset"):
        bench.main(["--preset", "huge", "--only", "decode"])
    with pytest.raises(TinyMindError, match="--render .*not found"):
        bench.main(["--render", "out/no_such_bench.json"])
    with pytest.raises(TinyMindError, match="--repeats must be >= 1"):
        bench.main(["--repeats", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(TinyMindError, match="CUDA is not available"):
            bench.main(["--device", "cuda"])


def test_lora_135m_flop_count_and_variants():
    """The LoRA step's FLOPs: 4 per frozen weight (forward + input gradient, no weight gradient), 6 per
    adapter weight, 12 L T C for attention; each variant is set up as train_lora.py's flags set it up."""
    shape = bench.QUICK_REAL
    model = bench.real_model(shape, "bf16_ckpt", torch.device("cpu"))
    C, I, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = C // shape["num_attention_heads"] * shape["num_key_value_heads"]
    frozen = L * (2 * C * C + 2 * C * kv + 3 * C * I) + V * C
    r = bench.REAL_RANK
    adapters = L * r * (2 * (C + C) + 2 * (C + kv) + 2 * (C + I) + (I + C))
    assert bench.lora_step_flops_per_token(model, 32) == 4 * frozen + 6 * adapters + 12 * L * 32 * C
    assert model.model.gradient_checkpointing and model.head_chunk_rows == 256
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    today = bench.real_model(shape, "today", torch.device("cpu"))
    assert not today.model.gradient_checkpointing and today.head_chunk_rows == 0
    assert today.lm_head.weight.dtype == torch.float32
