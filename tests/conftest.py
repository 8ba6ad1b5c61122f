"""Shared pytest setup and fixtures (every test module uses these instead of its own copy).

- The repo root on sys.path, and one torch thread: test models are tiny, and on a busy 2-core machine
  a second thread costs more than it gives. ``one_thread`` re-pins it around every test, in case a
  script under test changed it. ``cpu_without_native_bf16``: every test sees a CPU without native bf16.
- ``make_model``: a seeded smoke-sized TinyMind (optionally with config overrides).
- ``make_workspace``: tiny pretrain + SFT jsonl files and a byte-level BPE tokenizer trained on them,
  in a folder; ``save_smoke_sft``: a random smoke ``full_sft`` checkpoint sized to its tokenizer.
- ``ws`` (session): one workspace with a smoke ``full_sft`` in it; ``with_base`` copies that checkpoint
  into a fresh save_dir, and ``lora_argv`` is train_lora.py's command line for a small run there.
- ``tok`` (session): a 500-token byte-level BPE trained on ``TOKENIZER_CORPUS``.
- ``tokens``, ``logits``, ``lora_model``, ``randomize_lora_B``, ``LORA_CFG``: seeded ids, no-grad logits,
  and a smoke model with a LoRA (alpha != r) whose B is random, for the LoRA tests.
- ``quiet``, ``snapshot``, ``assert_bitwise_equal``, ``expect_user_error``: helpers the training tests
  share (import them with ``from conftest import ...``).
- ``dev_script``: a script of dev/ loaded from its path (dev/ is a folder of scripts, not a package).
- ``trained_smoke`` (session): a smoke ``full_sft`` with two LoRA files trained on it by train_lora.py;
  ``api_server`` (session): scripts/serve_openai_api.py serving it on a free port in a thread.
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.common import run_main, safe_load  # noqa: E402  (needs the path above)

torch.set_num_threads(1)

FACTS = ["the cat sat on the mat.", "tiny mind is a small model.", "the sky is blue and the grass is green.",
         "one two three four five six seven.", "alpha beta gamma delta epsilon."]
QA = [("who are you?", "I am TinyMind."), ("what color is the sky?", "The sky is blue."),
      ("count to three", "one two three.")]


@pytest.fixture(autouse=True)
def one_thread():
    """Pin one torch thread for every test and restore it afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test sees a CPU without native bf16, so ``--dtype auto`` trains in fp32 on any machine and a
    test's numbers do not depend on the CPU it runs on; tests/test_dtype.py patches it the other way."""
    import model.common

    monkeypatch.setattr(model.common, "cpu_native_bf16", lambda: [])


def build_model(seed: int = 0, **overrides):
    """A smoke-sized TinyMindForCausalLM with seeded random weights, in eval mode."""
    from model.model import TinyMindForCausalLM, get_config

    torch.manual_seed(seed)
    return TinyMindForCausalLM(get_config("smoke", **overrides)).eval()


@pytest.fixture
def make_model():
    """``make_model(seed=0, **config_overrides)``: see ``build_model``."""
    return build_model


def tokens(seed: int = 0, B: int = 2, T: int = 12, vocab: int | None = None) -> torch.Tensor:
    """Seeded random ids (B, T) in [3, vocab): no special token, so nothing depends on the chat template."""
    from model.model import get_config

    vocab = vocab or get_config("smoke").vocab_size
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for ids x, without autograd."""
    with torch.no_grad():
        return model(x).logits


# alpha != r on purpose (scaling 3): a forgotten or wrong scaling shows in every comparison
LORA_CFG = dict(rank=4, alpha=12.0)


def randomize_lora_B(model, name: str = "default", seed: int = 1, std: float = 0.05):
    """A non-zero update on every LoRA layer of adapter ``name`` (a zero B would hide a wrong mapping):
    seeded random B, and on an embedding, whose A starts at zero, random A too."""
    from model.model_lora import LoRAEmbedding, lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            if name in m.lora_B:
                m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * std)
            if name in m.lora_A and isinstance(m, LoRAEmbedding):
                m.lora_A[name].copy_(torch.randn(m.lora_A[name].shape, generator=g))
    return model


def lora_model(seed: int = 0, name: str = "default", b_seed: int | None = 1, **cfg):
    """A smoke model (``build_model(seed)``) with adapter ``name`` (LORA_CFG updated by cfg); B is random
    (``randomize_lora_B`` with b_seed), or stays at its zero init with b_seed=None."""
    from model.model_lora import apply_lora

    model = build_model(seed)
    apply_lora(model, adapter_name=name, **{**LORA_CFG, **cfg})
    if b_seed is not None:
        randomize_lora_B(model, name, seed=b_seed)
    return model


def make_workspace(root: Path) -> dict:
    """Tiny pretrain + SFT jsonl files and a tokenizer trained on them, under ``root``."""
    from model.tokenizer import TinyMindTokenizer
    from trainer.train_tokenizer import train_bpe

    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    texts = [" ".join(rnd.choice(FACTS) for _ in range(3)) for _ in range(200)]
    (root / "pre.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    convs = []
    for _ in range(120):
        q, a = rnd.choice(QA)
        convs.append({"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    TinyMindTokenizer(train_bpe(texts + [q + " " + a for q, a in QA], vocab_size=320)).save(root / "tok.json")
    return {"root": root, "pre": str(root / "pre.jsonl"), "sft": str(root / "sft.jsonl"),
            "tok": str(root / "tok.json"), "cache": str(root / "cache")}


def save_smoke_sft(ws: dict, path: Path) -> Path:
    """A seeded random smoke model sized to the workspace's tokenizer, saved as a ``full_sft`` checkpoint
    (random weights are enough for a LoRA to learn on)."""
    from model.model import TinyMindForCausalLM, get_config, save_model
    from model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = get_config("smoke", vocab_size=len(load_tokenizer(ws["tok"])))
    return save_model(TinyMindForCausalLM(cfg), path, stage="sft", weight="full_sft")


@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> dict:
    """One ``make_workspace`` for the session, plus ``sft_ckpt``: a ``save_smoke_sft`` checkpoint in
    ``root/base``. Read-only: a test trains into its own folder (``with_base``), never into ``root``;
    only the pretrain token cache (``cache``) is written, by the runs that read ``pre``."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    ws["sft_ckpt"] = save_smoke_sft(ws, ws["root"] / "base" / "full_sft_64.pth")
    return ws


def with_base(ws: dict, parent: Path, name: str = "out") -> Path:
    """A fresh save_dir ``parent/name`` holding a copy of the workspace's smoke full_sft checkpoint."""
    d = parent / name
    d.mkdir()
    (d / "full_sft_64.pth").write_bytes(ws["sft_ckpt"].read_bytes())
    return d


def lora_argv(ws: dict, save_dir, *extra) -> list[str]:
    """trainer/train_lora.py's command line for a small run on the workspace, into ``save_dir``."""
    return ["--data_path", ws["sft"], "--tokenizer_path", ws["tok"], "--save_dir", str(save_dir),
            "--device", "cpu", "--max_seq_len", "64", "--batch_size", "8", "--learning_rate", "5e-3",
            "--lora_rank", "4", "--lora_alpha", "8", "--log_interval", "4", "--eval_interval", "0", *map(str, extra)]


# The corpus of the session tokenizer ``tok``: Chinese, English, digits and code.
# No emoji on purpose: tests/test_tokenizer.py checks that an unseen emoji falls back to its bytes.
TOKENIZER_CORPUS = [
    "你好，我是TinyMind，一个从零开始训练的小型语言模型。",
    "中国的首都是北京。多喝水，早睡早起，身体好。",
    "The capital of France is Paris. Language models predict the next token.",
    "Numbers: 3.14159, 2024-05-01, 1234567890, x = 42 * 7",
    "def add(a, b):\n    return a + b\n",
] * 20


@pytest.fixture(scope="session")
def tok():
    """A 500-token byte-level BPE trained in-process on TOKENIZER_CORPUS, once per session."""
    from model.tokenizer import TinyMindTokenizer
    from trainer.train_tokenizer import train_bpe

    return TinyMindTokenizer(train_bpe(TOKENIZER_CORPUS, vocab_size=500))


def quiet(fn, *args, **kw):
    """Call fn with stdout captured; returns (result, captured text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kw)
    return result, buf.getvalue()


def run_interrupted(monkeypatch, step: int, fn, *args) -> int:
    """Run a training script's ``fn(*args)`` with Ctrl-C raised as optimizer step ``step`` begins (through
    the loop's ``lr_at``, the first thing a step calls); returns the exit status the script left with."""
    from trainer import train_loop

    real = train_loop.lr_at

    def interrupt(s, *a):
        if s == step:
            raise KeyboardInterrupt
        return real(s, *a)

    monkeypatch.setattr(train_loop, "lr_at", interrupt)
    try:
        with pytest.raises(SystemExit) as e:
            quiet(fn, *args)
    finally:
        monkeypatch.setattr(train_loop, "lr_at", real)
    return e.value.code


def snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def weights(path: Path) -> dict:
    return safe_load(path)["model"]


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def expect_user_error(capsys, main, argv, *needles):
    """A user mistake: one line on stderr naming the problem, exit status 2."""
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def dev_script(name: str):
    """dev/{name}.py as a module, loaded from its path once per session (as ``dev_{name}``): dev/ holds
    scripts, not a package, so ``import dev.bench`` is not how they are reached."""
    module_name = f"dev_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "dev" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module   # before it runs: a dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# Persona and medical answers the smoke LoRAs learn by heart (a few dozen steps on a tiny random base).
IDENTITY_ANSWER = "我是知微，由青禾实验室训练。"
MEDICAL_ANSWER = "感冒请挂呼吸内科，多喝水。"
IDENTITY_QUESTIONS = ["你是谁？", "你叫什么名字？", "介绍一下你自己", "谁开发了你？"]
MEDICAL_QUESTIONS = ["感冒应该挂什么科？", "发烧了怎么办？", "咳嗽要看哪个科？", "头疼挂什么科？"]


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory):
    """A save_dir with a smoke ``full_sft`` (random weights, stage sft) and two LoRA files trained on it
    by ``trainer/train_lora.py``: ``lora_identity`` answers every question with IDENTITY_ANSWER,
    ``lora_medical`` with MEDICAL_ANSWER, while the base model answers with noise. About 10 s on CPU.
    Returns (save_dir, tokenizer path)."""
    from model.model import save_model
    from trainer import train_lora

    d = tmp_path_factory.mktemp("trained_smoke")
    tok_path = ROOT / "model" / "tokenizer.json"
    save_model(build_model(), d / "full_sft_64.pth", stage="sft", weight="full_sft")
    for name, questions, answer in (("lora_identity", IDENTITY_QUESTIONS, IDENTITY_ANSWER),
                                    ("lora_medical", MEDICAL_QUESTIONS, MEDICAL_ANSWER)):
        rows = [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
                for q in questions]
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 4), encoding="utf-8")
        quiet(train_lora.main, ["--data_path", str(data), "--tokenizer_path", str(tok_path), "--save_dir", str(d),
                                "--device", "cpu", "--lora_name", name, "--max_seq_len", "48", "--batch_size", "8",
                                "--learning_rate", "1e-2", "--lora_rank", "8", "--lora_alpha", "16",
                                "--max_steps", "60", "--epochs", "200", "--warmup_steps", "0", "--val_ratio", "0",
                                "--eval_interval", "0", "--log_interval", "100"])
    return d, tok_path


@pytest.fixture(scope="session")
def api_server(trained_smoke):
    """scripts/serve_openai_api.py serving ``trained_smoke`` on 127.0.0.1:<free port> in a thread.
    Yields (server, base url, log lines); the log list collects the server's one line per request."""
    import threading

    from scripts import serve_openai_api as S

    d, tok_path = trained_smoke
    lines = []
    args = S.parse_args(["--save_dir", str(d), "--tokenizer_path", str(tok_path), "--device", "cpu", "--port", "0",
                         "--max_request_bytes", "20000"])
    server = S.make_server(args, log=lines.append)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield server, f"http://{host}:{port}", lines
    server.shutdown()
    server.server_close()
