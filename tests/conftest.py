"""Shared pytest setup and fixtures (every test module uses these instead of its own copy).

- The repo root on sys.path, and one torch thread: test models are tiny, and on a busy 2-core machine
  a second thread costs more than it gives. ``one_thread`` re-pins it around every test, in case a
  script under test changed it.
- ``make_model``: a seeded smoke-sized TinyMind (optionally with config overrides).
- ``make_workspace``: tiny pretrain + SFT jsonl files and a byte-level BPE tokenizer trained on them,
  in a folder (the training tests make one per module).
- ``quiet``, ``snapshot``, ``assert_bitwise_equal``, ``expect_user_error``: helpers the training tests
  share (import them with ``from conftest import ...``).
"""
import contextlib
import hashlib
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


def build_model(seed: int = 0, **overrides):
    """A smoke-sized TinyMindForCausalLM with seeded random weights, in eval mode."""
    from model.model import TinyMindForCausalLM, get_config

    torch.manual_seed(seed)
    return TinyMindForCausalLM(get_config("smoke", **overrides)).eval()


@pytest.fixture
def make_model():
    """``make_model(seed=0, **config_overrides)``: see ``build_model``."""
    return build_model


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


def quiet(fn, *args, **kw):
    """Call fn with stdout captured; returns (result, captured text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args, **kw)
    return result, buf.getvalue()


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
