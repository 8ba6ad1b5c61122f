"""Tokenizer: byte-level round trips, special ids, the ChatML template, loading errors, the trainer script."""
import json

import pytest

from conftest import TOKENIZER_CORPUS as CORPUS   # what the session tokenizer ``tok`` was trained on
from model.common import ROOT, TinyMindError
from model.tokenizer import SPECIAL_TOKENS, load_tokenizer
from trainer import train_tokenizer

ROUND_TRIP = {
    "chinese": "人工智能是计算机科学的一个分支，研究如何让机器理解语言。",
    "english": "The quick brown fox jumps over the lazy dog.",
    "digits": "0123456789 3.14159 -42 1e-5 2024年5月1日",
    "emoji": "😀🎉👍🏽 emoji 🇨🇳 ok",
    "mixed": "TinyMind 使用 byte-level BPE，词表 6400，runs on CPU 🙂 in minutes。",
    "whitespace": "  leading spaces\n\n\ttabs\r\nwindows line\u3000全角空格 trailing  ",
    "unseen_script": "Ελληνικά русский 日本語のテキスト 한국어 עברית",
}


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert SPECIAL_TOKENS[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode(s) == [i]
    assert len(tok) == tok.vocab_size <= 500


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip(tok, name):
    text = ROUND_TRIP[name]
    ids = tok.encode(text)
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # plain text never produces a special id
    assert tok.decode(ids) == text


def test_bpe_merges_compress(tok):
    # Trained merges make seen text shorter than its UTF-8 bytes; unseen emoji fall back to bytes.
    text = CORPUS[0]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2
    assert len(tok.encode("😀")) == len("😀".encode("utf-8"))


def test_encode_add_special_tokens_and_decode_skip(tok):
    ids = tok.encode("hello")
    assert tok.encode("hello", add_special_tokens=True) == [1, *ids, 2]
    assert tok.decode([1, *ids, 2]) == "hello"
    assert tok.decode([1, *ids, 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    import torch
    assert tok.decode(torch.tensor([1, *ids, 2])) == "hello"
    assert tok.encode_batch(["hello", "你好"]) == [ids, tok.encode("你好")]


def test_chat_template_exact(tok):
    msgs = [{"role": "system", "content": "You are TinyMind."},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！我是TinyMind。"},
            {"role": "user", "content": "1+1=?"}]
    expected = ("<|im_start|>system\nYou are TinyMind.<|im_end|>\n"
                "<|im_start|>user\n你好<|im_end|>\n"
                "<|im_start|>assistant\n你好！我是TinyMind。<|im_end|>\n"
                "<|im_start|>user\n1+1=?<|im_end|>\n")
    assert tok.apply_chat_template(msgs) == expected
    with_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert with_prompt == expected + "<|im_start|>assistant\n"
    ids = tok.encode(with_prompt)
    # Each special string inside the rendered text is exactly one special id.
    assert ids.count(1) == 5 and ids.count(2) == 4 and ids[0] == 1
    assert tok.decode(ids, skip_special_tokens=False) == with_prompt
    assert tok.apply_chat_template([]) == ""
    with pytest.raises(TinyMindError, match="chat message 0"):
        tok.apply_chat_template([{"role": "user"}])


def test_load_tokenizer_errors(tmp_path, tok):
    with pytest.raises(TinyMindError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')  # truncated JSON
    with pytest.raises(TinyMindError, match="not a readable tokenizer"):
        load_tokenizer(bad)
    good = tok.save(tmp_path / "tok.json")
    assert not (tmp_path / "tok.json.tmp").exists()
    again = load_tokenizer(good)
    assert again.encode(ROUND_TRIP["mixed"]) == tok.encode(ROUND_TRIP["mixed"])
    assert again.fingerprint == tok.fingerprint


def test_wrong_special_ids_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>"]))
    t.save(str(tmp_path / "other.json"))
    with pytest.raises(TinyMindError, match="expected 0"):
        load_tokenizer(tmp_path / "other.json")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def test_train_tokenizer_main(tmp_path, capsys):
    pre = _write(tmp_path / "pre.jsonl", [{"text": t} for t in CORPUS])
    sft = _write(tmp_path / "sft.jsonl", [{"conversations": [{"role": "user", "content": "你是谁？"},
                                                             {"role": "assistant", "content": "我是TinyMind。"}]}] * 30)
    out = tmp_path / "sub" / "tokenizer.json"
    tok = train_tokenizer.main(["--data_path", f"{pre},{sft}", "--vocab_size", "420", "--out", str(out)])
    log = capsys.readouterr().out
    assert out.is_file() and not out.with_name(out.name + ".tmp").exists()
    loaded = load_tokenizer(out)
    assert loaded.vocab_size == tok.vocab_size <= 420
    assert [loaded.id_to_token(i) for i in range(8)] == SPECIAL_TOKENS
    assert "chars/token" in log and "zh" in log and "en" in log and "mixed" in log
    assert loaded.decode(loaded.encode("我是TinyMind。")) == "我是TinyMind。"
    # Role names from chat files are part of the corpus, so "assistant" gets merged into few tokens.
    assert len(loaded.encode("assistant")) <= 3
    # Same corpus, same tokenizer (deterministic).
    out2 = tmp_path / "again.json"
    train_tokenizer.main(["--data_path", f"{pre},{sft}", "--vocab_size", "420", "--out", str(out2)])
    assert out2.read_text() == out.read_text()


def test_train_tokenizer_bad_input(tmp_path):
    with pytest.raises(TinyMindError, match="data file not found"):
        train_tokenizer.main(["--data_path", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.json")])
    pre = _write(tmp_path / "pre.jsonl", [{"text": t} for t in CORPUS[:5]] + ["{not json"])
    with pytest.raises(TinyMindError, match="too small"):
        train_tokenizer.main(["--data_path", str(pre), "--vocab_size", "100", "--out", str(tmp_path / "t.json")])
    out = tmp_path / "t.json"
    out.write_text("previous")
    with pytest.raises(TinyMindError, match=r"pre\.jsonl line 6: malformed JSON"):
        train_tokenizer.main(["--data_path", str(pre), "--vocab_size", "300", "--out", str(out)])
    assert out.read_text() == "previous"  # a failed run leaves the old file alone
    train_tokenizer.main(["--data_path", str(pre), "--vocab_size", "300", "--out", str(out), "--skip_bad_lines", "1"])
    assert load_tokenizer(out).vocab_size <= 300


SHIPPED = ROOT / "model" / "tokenizer.json"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="model/tokenizer.json not trained yet")
def test_shipped_tokenizer():
    tok = load_tokenizer()  # default path
    assert tok.path == SHIPPED
    assert tok.vocab_size == 6400
    assert [tok.id_to_token(i) for i in range(8)] == SPECIAL_TOKENS
    for text in ROUND_TRIP.values():
        assert tok.decode(tok.encode(text)) == text
    # Merges learned on the demo corpus: Chinese text needs well under one token per character.
    assert len(tok.encode(ROUND_TRIP["chinese"])) < len(ROUND_TRIP["chinese"])


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    """load_model_tokenizer, the one check every command that pairs a tokenizer with a model goes through
    (chat, evaluation, conversion): a tokenizer with more tokens than the model's vocabulary is not its own."""
    from conftest import expect_user_error
    from model.tokenizer import DEFAULT_TOKENIZER_PATH, load_model_tokenizer
    from scripts import evaluate

    tok = load_model_tokenizer(DEFAULT_TOKENIZER_PATH, 6400, "m.pth")
    assert len(tok) == 6400
    with pytest.raises(TinyMindError, match="has 6400 tokens but m.pth only 100: not the tokenizer"):
        load_model_tokenizer(DEFAULT_TOKENIZER_PATH, 100, "m.pth")
    from model.model import TinyMindForCausalLM, get_config, save_model
    save_model(TinyMindForCausalLM(get_config("smoke", vocab_size=300)), tmp_path / "full_sft_64.pth", stage="sft")
    expect_user_error(capsys, evaluate.main, ["--save_dir", str(tmp_path), "--limit", "1"],
                      "6400 tokens but full_sft_64.pth only 300")
