"""eval_llm.py: --prompt, stdin lines, LoRA (+merge), pretrain continuation, chat commands, bad input.

Everything runs on a randomly initialised `smoke` model saved in a temp folder, so the tests check the
plumbing (which prompt is built, what is printed, which adapter runs), not the quality of the replies.
"""
import builtins
import io
import sys

import pytest
import torch

import eval_llm
from conftest import randomize_lora_B
from model.common import ROOT, TinyMindError, run_main
from model.model import get_config, load_model, save_model, TinyMindForCausalLM
from model.model_lora import apply_lora, save_lora
from model.tokenizer import SPECIAL_TOKENS, TinyMindTokenizer

H = get_config("smoke").hidden_size


def tiny_tokenizer(path):
    """A small byte-level BPE trained here (used only until the shipped model/tokenizer.json exists)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["你好，我是 TinyMind，一个小型语言模型。", "Hello world, how are you?"] * 50, trainer)
    tok.save(str(path))
    return path


def random_lora(checkpoint, path, name, **cfg):
    """A LoRA file whose B is random (non-zero), so the adapter really changes the model."""
    model, _ = load_model(checkpoint)
    apply_lora(model, adapter_name=name, **cfg)
    randomize_lora_B(model, name, std=0.5)
    save_lora(model, path, adapter_name=name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A save_dir with full_sft (stage sft), pretrain (stage pretrain) and two LoRA files; the tokenizer."""
    d = tmp_path_factory.mktemp("out")
    shipped = ROOT / "model" / "tokenizer.json"
    tok_path = shipped if shipped.is_file() else tiny_tokenizer(d / "tokenizer.json")
    torch.manual_seed(0)
    model = TinyMindForCausalLM(get_config("smoke"))
    save_model(model, d / f"full_sft_{H}.pth", stage="sft", weight="full_sft")
    save_model(model, d / f"pretrain_{H}.pth", stage="pretrain", weight="pretrain")
    random_lora(d / f"full_sft_{H}.pth", d / f"lora_test_{H}.pth", "lora_test", rank=4, alpha=16.0)
    random_lora(d / f"full_sft_{H}.pth", d / f"lora_two_{H}.pth", "lora_two", rank=2, alpha=4.0,
                targets="q_proj,v_proj")
    return d, tok_path


def run(world, *args):
    d, tok_path = world
    return eval_llm.main(["--save_dir", str(d), "--tokenizer_path", str(tok_path), "--max_new_tokens", "8",
                          "--temperature", "0", *args])


def session(world, *args):
    d, tok_path = world
    return eval_llm.Session(eval_llm.parse_args(["--save_dir", str(d), "--tokenizer_path", str(tok_path),
                                                 "--max_new_tokens", "8", "--temperature", "0", *args]))


def test_prompt_answers_once(world, capsys):
    run(world, "--weight", "full_sft", "--prompt", "你好")
    out, err = capsys.readouterr()
    assert f"full_sft_{H}.pth: stage sft" in err and "tokens/s" in err
    streamed = out
    run(world, "--weight", "full_sft", "--prompt", "你好", "--stream", "0")
    assert capsys.readouterr().out == streamed  # streaming prints exactly the final text
    reply, n, _ = session(world).answer("你好")
    assert streamed == reply + "\n" and 1 <= n <= 8


def test_streaming_waits_for_complete_utf8(world):
    s = session(world)
    text = "你好，TinyMind！龘🙂"  # rare characters: their UTF-8 bytes span several tokens
    ids = s.tok.encode(text)
    assert any(s.tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # the case under test

    def fake_generate(input_ids, streamer=None, **kw):  # emit the tokens of `text` one by one
        for i in ids:
            streamer(torch.tensor([i]))
        return torch.cat([input_ids, torch.tensor([ids])], dim=1)

    s.model.generate = fake_generate
    chunks = []
    out = io.StringIO()
    out.write = lambda c: chunks.append(c)
    assert s.answer("hi", stream=out)[0] == text
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_stdin_lines_get_one_reply_each(world, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nHello\n"))
    run(world, "--weight", "full_sft")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0] == session(world).answer("你好")[0].replace("\n", "\\n")


def test_lora_changes_output_and_merge_matches(world, capsys):
    base = session(world)
    lora = session(world, "--lora_weight", "lora_test")
    prompt = lora.tok.encode(lora.tok.apply_chat_template([{"role": "user", "content": "你好"}], True))
    x = torch.tensor([prompt])
    assert not torch.allclose(base.model(x).logits, lora.model(x).logits, atol=1e-3)
    merged = session(world, "--lora_weight", "lora_test", "--merge")
    greedy = lambda s: s.model.generate(x, max_new_tokens=8, temperature=0, eos_token_id=None)
    assert torch.equal(greedy(lora), greedy(merged)) and not torch.equal(greedy(lora), greedy(base))
    run(world, "--prompt", "你好", "--lora_weight", "lora_test")
    unmerged = capsys.readouterr()
    run(world, "--prompt", "你好", "--lora_weight", "lora_test", "--merge")
    merged = capsys.readouterr()
    assert "LoRA lora_test (merged)" in merged.err
    assert merged.out == unmerged.out


def test_several_adapters_all_active(world):
    s = session(world, "--lora_weight", "lora_test,lora_two")
    assert s.switch_adapter("") == "loaded adapters: lora_test, lora_two; active: lora_test, lora_two"
    assert s.switch_adapter("lora_two").endswith("active: lora_two")


def test_missing_weight_and_lora(world, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: run(world, "--weight", "nope"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope_<hidden>.pth not found" in err  # no --hidden_size: any nope_*.pth would do (find_checkpoint)
    assert f"full_sft_{H}, lora_test_{H}, lora_two_{H}, pretrain_{H}" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(TinyMindError, match=f"lora_x_{H}.pth not found; weights in .*: full_sft_{H}"):
        run(world, "--lora_weight", "lora_x")
    with pytest.raises(TinyMindError, match="num_hidden_layers 9 does not match"):
        run(world, "--num_hidden_layers", "9", "--prompt", "x")


def test_lora_for_another_base_is_refused(world, tmp_path):
    d, tok_path = world
    other = TinyMindForCausalLM(get_config("smoke"))  # other random weights, same config
    save_model(other, tmp_path / f"full_sft_{H}.pth", stage="sft")
    (tmp_path / f"lora_test_{H}.pth").write_bytes((d / f"lora_test_{H}.pth").read_bytes())
    with pytest.raises(TinyMindError, match="other base weights"):
        eval_llm.main(["--save_dir", str(tmp_path), "--tokenizer_path", str(tok_path), "--prompt", "x",
                       "--lora_weight", "lora_test"])


def test_pretrain_checkpoint_continues_text(world, capsys, monkeypatch):
    def no_template(*a, **k):
        raise AssertionError("chat template used")
    monkeypatch.setattr(TinyMindTokenizer, "apply_chat_template", no_template)
    run(world, "--weight", "pretrain", "--prompt", "你好")
    assert "stage pretrain" in capsys.readouterr().err
    s = session(world, "--weight", "pretrain")
    assert s.prompt_ids("你好") == [s.tok.bos_id] + s.tok.encode("你好")
    with pytest.raises(AssertionError, match="chat template"):
        run(world, "--weight", "full_sft", "--prompt", "你好")


def test_history_is_dropped_before_the_context_overflows(world, tmp_path):
    d, tok_path = world
    model, _ = load_model(d / f"full_sft_{H}.pth")
    model.config.max_position_embeddings = 64
    save_model(model, tmp_path / f"full_sft_{H}.pth", stage="sft")
    s = eval_llm.Session(eval_llm.parse_args(["--save_dir", str(tmp_path), "--tokenizer_path", str(tok_path),
                                              "--history", "3", "--max_new_tokens", "8"]))
    s.history = [("问题一 " * 8, "回答一 " * 8), ("q2", "a2")]
    ids = s.tok.decode(s.prompt_ids("hi"))
    assert "q2" in ids and "问题一" not in ids  # the oldest turn went first
    with pytest.raises(TinyMindError, match="context is 64"):
        s.prompt_ids("".join(chr(0x4E00 + i) for i in range(200)))  # 200 distinct characters


def test_chat_commands(world, capsys, monkeypatch):
    s = session(world, "--lora_weight", "lora_test", "--history", "2")
    with_lora = session(world, "--lora_weight", "lora_test").answer("你好")[0]
    without = session(world).answer("你好")[0]
    seen = []
    inputs = iter(["/help", "你好", "/reset", "/adapter off", "你好", "/adapter", "/adapter bogus",
                   "/adapter lora_test", "/bogus", "/exit", "never read"])

    def fake_input(prompt=""):
        seen.append(len(s.history))
        return next(inputs)

    monkeypatch.setattr(builtins, "input", fake_input)
    eval_llm.chat_loop(s)
    out = capsys.readouterr().out
    assert seen[:5] == [0, 0, 1, 0, 0]                    # one turn remembered, then /reset forgot it
    assert len(seen) == 10                                 # /exit stopped the loop
    assert "/adapter NAME" in out and "(history cleared)" in out and out.count("tokens/s") == 2
    replies = [line[len("Assistant: "):] for line in out.splitlines() if line.startswith("Assistant: ")]
    assert replies == [with_lora.split("\n")[0], without.split("\n")[0]]  # /adapter off ran the base model
    assert "active: none (base model)" in out
    assert "no adapter named 'bogus'" in out and "unknown command /bogus" in out
    s.history.clear()
    assert s.answer("你好")[0] == with_lora                 # "/adapter lora_test" switched it back on


@pytest.mark.parametrize("stop", [EOFError, KeyboardInterrupt])
def test_chat_exits_cleanly_on_eof_and_ctrl_c(world, monkeypatch, capsys, stop):
    def fake_input(prompt=""):
        raise stop
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(sys, "stdin", type("TTY", (io.StringIO,), {"isatty": lambda self: True})())
    run(world)   # returns normally: no traceback, no exception
    out, err = capsys.readouterr()
    banner = "TinyMind chat (history"
    assert out.startswith(banner) and out.count("\n") == (2 if stop is EOFError else 1)
    # the shell prompt that follows starts on a line of its own: Ctrl-D ends stdout, Ctrl-C stderr with a newline
    assert out.endswith("\n\n") == (stop is EOFError) and err.endswith("\n\n") == (stop is KeyboardInterrupt)


def test_auto_mode_runs_every_demo_prompt(world, capsys):
    run(world, "--mode", "auto", "--max_new_tokens", "2")
    out = capsys.readouterr().out
    assert all(f"User: {p}" in out for p in eval_llm.DEMO_PROMPTS)
    assert out.count("tokens/s") == len(eval_llm.DEMO_PROMPTS)
