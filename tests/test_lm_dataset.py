"""Loaders: packing without padding, the token cache, the SFT loss mask, truncation, collate, bad data."""
import json
import pickle
from pathlib import Path

import pytest
import torch

import dataset.lm_dataset as lm
from dataset.lm_dataset import IGNORE_INDEX, PretrainDataset, SFTDataset, collate_batch
from model.common import TinyMindError
from model.tokenizer import TinyMindTokenizer
from trainer.train_tokenizer import train_bpe

DOCS = [
    "你好，我是TinyMind，一个从零开始训练的小型语言模型。",
    "The capital of France is Paris.",
    "北京是中国的首都，长城很长。1+1=2。",
    "Emoji 😀 and digits 0123456789.",
    "多喝水，早睡早起，身体好。Sleep well and drink water.",
] * 8

CONV = [{"role": "system", "content": "You are TinyMind."},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是TinyMind，一个小模型。"},
        {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "1+1=2。"}]


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            elif isinstance(r, str):
                f.write(r.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def direct_stream(tok, docs):
    return [t for d in docs for t in tok.encode(d, add_special_tokens=True)]


# ----------------------------------------------------------------------------- pretraining

def test_packing_keeps_every_token_once_in_order(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(lm, "BATCH_LINES", 3)  # several encode batches, as in a big file
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    T = 17
    ds = PretrainDataset(path, tok, max_seq_len=T, cache_dir=tmp_path / "cache")
    stream = direct_stream(tok, DOCS)
    assert ds.num_tokens == len(stream) and ds.num_docs == len(DOCS)
    assert len(ds) == len(stream) // T and ds.num_dropped_tokens == len(stream) % T
    windows = [ds[i] for i in range(len(ds))]
    for x, y in windows:
        assert x.dtype == torch.long and x.shape == (T,) and torch.equal(x, y)
        assert (x != tok.pad_id).all()  # never padded
    packed = torch.cat([x for x, _ in windows]).tolist()
    assert packed == stream[:len(ds) * T]
    assert torch.equal(ds[-1][0], windows[-1][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # Batches of full windows need no attention mask padding.
    ids, labels, mask = collate_batch(windows[:4])
    assert ids.shape == (4, T) and mask.all() and torch.equal(ids, labels)


def test_cache_reuse_and_invalidation(tmp_path, tok, capsys):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    cache = tmp_path / "cache"
    first = PretrainDataset(path, tok, max_seq_len=8, cache_dir=cache)
    assert first.cache_built and first.cache_path.parent == cache

    calls = []

    class Counting(TinyMindTokenizer):
        def encode_batch(self, texts):
            calls.append(len(texts))
            return super().encode_batch(texts)

    counting = Counting(tok.tokenizer)
    second = PretrainDataset(path, counting, max_seq_len=16, cache_dir=cache)  # another window size: same cache
    assert not second.cache_built and calls == []
    assert second.cache_path == first.cache_path
    assert torch.cat([second[i][0] for i in range(len(second))]).tolist() == \
        direct_stream(tok, DOCS)[:len(second) * 16]
    assert "cache reused" in capsys.readouterr().out

    write_jsonl(path, [{"text": d} for d in DOCS + ["一条新的文档。"]])  # the data changes
    third = PretrainDataset(path, counting, max_seq_len=8, cache_dir=cache)
    assert third.cache_built and calls and third.num_docs == len(DOCS) + 1
    assert third.cache_path != first.cache_path
    assert sorted(p.name for p in cache.iterdir()) == sorted([third.cache_path.name,
                                                              third.cache_path.with_suffix(".json").name])

    other_tok = TinyMindTokenizer(train_bpe(DOCS, vocab_size=300))  # the tokenizer changes
    fourth = PretrainDataset(path, other_tok, max_seq_len=8, cache_dir=cache)
    assert fourth.cache_built and fourth.cache_path != third.cache_path


def test_progress_lines_and_pickling(tmp_path, tok, monkeypatch, capsys):
    monkeypatch.setattr(lm, "BATCH_LINES", 4)
    monkeypatch.setattr(lm, "PROGRESS_EVERY_S", 0.0)
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    ds = PretrainDataset(path, tok, max_seq_len=8, cache_dir=tmp_path)
    out = capsys.readouterr().out
    assert "[tokenize]" in out and "lines" in out and "tokens" in out and "MB/s" in out
    ds[0]  # opens the memmap
    blob = pickle.dumps(ds)  # what a spawned DataLoader worker receives: no token data inside
    assert len(blob) < 2000
    assert torch.equal(pickle.loads(blob)[3][0], ds[3][0])


def test_pretrain_too_short_and_seq_len(tmp_path, tok):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": "hi"}])
    with pytest.raises(TinyMindError, match="fewer than one window"):
        PretrainDataset(path, tok, max_seq_len=64, cache_dir=tmp_path)
    with pytest.raises(TinyMindError, match="max_seq_len"):
        PretrainDataset(path, tok, max_seq_len=1, cache_dir=tmp_path)


def test_pretrain_distributed_single_rank(tmp_path, tok):
    # The DDP branch (rank 0 builds, barrier) with a one-process gloo group.
    import torch.distributed as dist
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ds = PretrainDataset(path, tok, max_seq_len=8, cache_dir=tmp_path / "cache")
        assert ds.cache_built and len(ds) > 0
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- SFT

def test_sft_labels_are_exactly_the_assistant_turns(tmp_path, tok):
    convs = [CONV, CONV[1:3], [{"role": "user", "content": " x"}, {"role": "assistant", "content": "\n\n y "}]]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    ds = SFTDataset(path, tok, max_seq_len=512)
    assert len(ds) == 3 and ds.num_truncated == 0
    for (x, y), conv in zip((ds[i] for i in range(len(ds))), convs):
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape
        # The tokens are the chat template, exactly; the loss sees only assistant content + <|im_end|>.
        assert tok.decode(x, skip_special_tokens=False) == tok.apply_chat_template(conv)
        target = "".join(m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant")
        assert tok.decode(x[y != IGNORE_INDEX], skip_special_tokens=False) == target
        assert torch.equal(y[y != IGNORE_INDEX], x[y != IGNORE_INDEX])
        # "<|im_start|>assistant\n" and the "\n" after <|im_end|> are context, never targets.
        starts = (x == tok.bos_id).nonzero().flatten()
        assert (y[starts] == IGNORE_INDEX).all() and (y[starts + 1] == IGNORE_INDEX).all()
        ends = (x == tok.eos_id).nonzero().flatten()
        assert y[-1] == IGNORE_INDEX and x[-1].item() == tok.encode("\n")[0]
        assert sum(int(y[e] == tok.eos_id) for e in ends) == sum(m["role"] == "assistant" for m in conv)
    # For ordinary content, SFT tokens equal encoding the whole rendered conversation at once
    # (what eval_llm does with the prompt), so training and inference agree.
    assert ds[0][0].tolist() == tok.encode(tok.apply_chat_template(CONV))


def test_sft_truncation_counted(tmp_path, tok):
    long_answer = "我是TinyMind，一个小模型。" * 20
    convs = [CONV[1:3],  # short: kept whole
             [CONV[1], {"role": "assistant", "content": long_answer}],  # cut inside the answer
             [{"role": "user", "content": long_answer}, {"role": "assistant", "content": "好"}]]  # answer cut away
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    ds = SFTDataset(path, tok, max_seq_len=40)
    assert ds.num_truncated == 2 and ds.num_dropped == 1 and len(ds) == 2
    assert len(ds[1][0]) == 40 and (ds[1][1] != IGNORE_INDEX).any()
    assert all(len(ds[i][0]) <= 40 for i in range(len(ds)))


def test_collate_batch_pads_to_longest(tmp_path, tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONV}, {"conversations": CONV[1:3]}])
    ds = SFTDataset(path, tok)
    items = [ds[1], ds[0]]
    ids, labels, mask = collate_batch(items, pad_id=0)
    T = max(len(x) for x, _ in items)
    assert ids.shape == labels.shape == mask.shape == (2, T)
    n = len(items[0][0])
    assert torch.equal(ids[0, :n], items[0][0]) and (ids[0, n:] == 0).all()
    assert (labels[0, n:] == IGNORE_INDEX).all() and torch.equal(labels[0, :n], items[0][1])
    assert mask[0, :n].all() and not mask[0, n:].any() and mask[1].all()
    ids7, _, _ = collate_batch(items, pad_id=7)
    assert (ids7[0, n:] == 7).all()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_batch)
    assert next(iter(loader))[0].shape == (2, T)


# ----------------------------------------------------------------------------- bad data

GOOD_TEXT = {"text": "你好 hello"}
GOOD_CONV = {"conversations": CONV[1:3]}
BAD_CASES = {  # name -> (pretrain line, sft line, expected message)
    "malformed_json": ('{"text": "oops', '{"conversations": [', "malformed JSON"),
    "missing_key": ({"content": "x"}, {"messages": []}, "missing key"),
    "empty_content": ({"text": "  "}, {"conversations": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": ""}]}, "empty content"),
    "invalid_utf8": (b'{"text": "\xff\xfe"}', b'{"conversations": "\xc3\x28"}', "invalid UTF-8"),
    "not_an_object": ("[1, 2]", '"just a string"', "expected a JSON object"),
}


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_reports_file_and_line(tmp_path, tok, kind, case):
    bad = BAD_CASES[case][0 if kind == "pretrain" else 1]
    good = GOOD_TEXT if kind == "pretrain" else GOOD_CONV
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", good, bad, good])  # blank line 2 is fine
    make = (lambda skip: PretrainDataset(path, tok, max_seq_len=4, cache_dir=tmp_path / "c", skip_bad_lines=skip)) \
        if kind == "pretrain" else (lambda skip: SFTDataset(path, tok, skip_bad_lines=skip))
    with pytest.raises(TinyMindError, match=rf"data\.jsonl line 4: .*{BAD_CASES[case][2]}"):
        make(False)
    ds = make(True)
    assert ds.num_bad_lines == 1
    if kind == "pretrain":
        assert ds.num_docs == 3
        with pytest.raises(TinyMindError, match="line 4"):  # a cache built while skipping does not hide the line
            make(False)
    else:
        assert len(ds) == 3


def test_sft_unknown_role_and_system_position(tmp_path, tok, capsys):
    rows = [GOOD_CONV,
            {"conversations": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"conversations": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                               {"role": "assistant", "content": "y"}]},
            {"conversations": [{"role": "user", "content": "only a question"}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(TinyMindError, match=r"sft\.jsonl line 2: turn 0: unknown role 'bot'"):
        SFTDataset(path, tok)
    write_jsonl(path, [rows[0], rows[2]])
    with pytest.raises(TinyMindError, match="line 2: turn 1: a system turn may only come first"):
        SFTDataset(path, tok)
    write_jsonl(path, [rows[0], rows[3]])
    with pytest.raises(TinyMindError, match="line 2: no assistant turn"):
        SFTDataset(path, tok)
    write_jsonl(path, rows)
    ds = SFTDataset(path, tok, skip_bad_lines=True)
    assert len(ds) == 1 and ds.num_bad_lines == 3
    assert "skipped 3 bad line(s)" in capsys.readouterr().out


def test_empty_and_missing(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TinyMindError, match="empty dataset"):
        PretrainDataset(empty, tok, cache_dir=tmp_path)
    with pytest.raises(TinyMindError, match="empty dataset"):
        SFTDataset(empty, tok)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(TinyMindError, match="empty dataset.*2 bad line"):
        PretrainDataset(all_bad, tok, cache_dir=tmp_path, skip_bad_lines=True)
    with pytest.raises(TinyMindError, match="empty dataset.*2 bad line"):
        SFTDataset(all_bad, tok, skip_bad_lines=True)
    assert not list(tmp_path.glob("*.bin*"))  # no cache left behind for a failed build
    with pytest.raises(TinyMindError, match="data file not found: .*missing.jsonl"):
        PretrainDataset(tmp_path / "missing.jsonl", tok, cache_dir=tmp_path)
    with pytest.raises(TinyMindError, match="data file not found: .*missing.jsonl"):
        SFTDataset(tmp_path / "missing.jsonl", tok)


def test_inspect_cli(tmp_path, tok, capsys):
    tok_path = tok.save(tmp_path / "tok.json")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONV}])
    ds = lm.main(["--data_path", str(sft), "--tokenizer_path", str(tok_path)])
    assert isinstance(ds, SFTDataset) and "loss on:" in capsys.readouterr().out
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    ds = lm.main(["--data_path", str(pre), "--tokenizer_path", str(tok_path), "--cache_dir", str(tmp_path / "c"),
                  "--max_seq_len", "32"])
    assert isinstance(ds, PretrainDataset) and len(ds[0][0]) == 32



def _ddp_worker(rank, world, tmp, tok, data):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world)
    try:
        ds = PretrainDataset(data, tok, max_seq_len=8, cache_dir=f"{tmp}/cache")
        result = {"built": ds.cache_built, "len": len(ds), "first": ds[0][0].tolist()}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_pretrain_cache_two_ranks(tmp_path, tok, monkeypatch):
    # Two real processes: only rank 0 tokenizes; rank 1 waits at the barrier and reads the same cache.
    monkeypatch.setattr(lm, "BATCH_LINES", 2)
    data = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, str(tmp_path), tok, str(data)),
                                          nprocs=2, start_method="fork")  # fork: no re-import, fast
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["built"] is True and r1["built"] is False
    assert (r0["len"], r0["first"]) == (r1["len"], r1["first"])
