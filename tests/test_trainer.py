"""The shared training loop (trainer/train_loop.py, trainer/resume.py) and the pretrain / SFT scripts.

Everything runs on the CPU with the ``smoke`` preset, a 320-token BPE tokenizer trained here and a tiny
repetitive corpus written to tmp_path, so a run takes a second or two.
"""
import contextlib
import io
import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from conftest import assert_bitwise_equal, expect_user_error, quiet, run_interrupted, snapshot, weights
from model.common import TinyMindError, safe_load, setup_device
from trainer import train_loop, train_pretrain, train_sft, trainer_utils
from trainer.resume import epoch_batches, get_rng_states, sample_lengths, set_rng_states, split_indices
from trainer.train_loop import build_optimizer, lr_at

# ------------------------------------------------------------------------------------------ helpers

def pretrain_argv(ws: dict, save_dir, *extra) -> list[str]:
    return ["--preset", "smoke", "--data_path", ws["pre"], "--tokenizer_path", ws["tok"], "--cache_dir", ws["cache"],
            "--save_dir", str(save_dir), "--device", "cpu", "--max_seq_len", "32", "--batch_size", "8",
            "--learning_rate", "3e-3", "--log_interval", "5", "--eval_interval", "0", "--val_ratio", "0.05",
            *map(str, extra)]


def sft_argv(ws: dict, save_dir, *extra) -> list[str]:
    return ["--data_path", ws["sft"], "--tokenizer_path", ws["tok"], "--save_dir", str(save_dir), "--device", "cpu",
            "--max_seq_len", "64", "--batch_size", "8", "--learning_rate", "2e-3", "--log_interval", "5",
            "--eval_interval", "0", *map(str, extra)]


@pytest.fixture(scope="module")
def pretrained(ws, tmp_path_factory):
    """One pretraining run (40 steps) shared by several tests: (save_dir, metrics, log text)."""
    out = tmp_path_factory.mktemp("pre_out")
    metrics, log = quiet(train_pretrain.main, pretrain_argv(ws, out, "--epochs", 2, "--max_steps", 40,
                                                                "--eval_interval", 20))
    return out, metrics, log


# ------------------------------------------------------------------------------------------ pieces

def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never increases
    assert lrs[-1] == pytest.approx(1e-4)  # the floor: min_lr_ratio * lr at the last step


def test_sampler_deterministic_sharded_and_resumable():
    one = epoch_batches(103, 4, seed=7, epoch=3)
    assert one == epoch_batches(103, 4, seed=7, epoch=3)  # a pure function of (seed, epoch)
    assert one != epoch_batches(103, 4, seed=7, epoch=4)
    assert sorted(i for b in one for i in b) == list(range(103))
    r0, r1 = (epoch_batches(103, 2, 7, 3, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1)  # ranks step together
    flat0, flat1 = [i for b in r0 for i in b], [i for b in r1 for i in b]
    assert not set(flat0) & set(flat1) and len(flat0) + len(flat1) == 102  # remainder dropped
    # global batch k of a 2-rank run = the same samples as batch k of one process with batch 4
    for k in range(len(r0) - 1):
        assert sorted(r0[k] + r1[k]) == sorted(one[k])
    assert set(r0[-1] + r1[-1]) < set(one[-1])  # the last one lacks the dropped remainder
    train, val = split_indices(50, 0.1, seed=1)
    assert len(val) == 5 and sorted(train + val) == list(range(50)) and (train, val) == split_indices(50, 0.1, 1)


def test_sampler_groups_by_length():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g).tolist()
    plain = epoch_batches(1000, 8, seed=3, epoch=1)
    grouped = epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths, group_size=16)
    assert grouped == epoch_batches(1000, 8, seed=3, epoch=1, lengths=lengths, group_size=16)
    assert sorted(i for b in grouped for i in b) == list(range(1000))  # each sample once per epoch
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded(grouped) < 0.7 * padded(plain)  # much less padding to compute
    assert len({max(lengths[i] for i in b) for b in grouped[:10]}) > 3  # batch order is still shuffled
    r0, r1 = (epoch_batches(1000, 8, 3, 1, r, 2, lengths=lengths) for r in (0, 1))
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    ds = Subset(type("D", (), {"lengths": lengths, "__len__": lambda self: 1000})(), [5, 2, 9])
    assert sample_lengths(ds) == [lengths[5], lengths[2], lengths[9]]


def test_optimizer_decays_matrices_only_and_skips_frozen():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    opt = build_optimizer(m, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert all(p is not m[2].weight for g in opt.param_groups for p in g["params"])


def test_rng_states_round_trip():
    st = get_rng_states(torch.device("cpu"))
    a = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    set_rng_states(st, torch.device("cpu"))
    assert (torch.rand(3), random.random(), __import__("numpy").random.rand())[1:] == a[1:]
    set_rng_states(st, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a[0])


def test_setup_device_cpu_and_bad_flags(capsys):
    ctx = setup_device("cpu", "auto")
    assert ctx.device.type == "cpu" and ctx.dtype == torch.float32 and ctx.scaler is None and not ctx.ddp
    assert "device cpu" in capsys.readouterr().out
    with pytest.raises(TinyMindError, match="float16"):
        setup_device("cpu", "float16", log=False)
    with pytest.raises(TinyMindError, match="--device"):
        setup_device("tpu", log=False)
    if not torch.cuda.is_available():
        with pytest.raises(TinyMindError, match="no CUDA"):
            setup_device("cuda", log=False)


# ------------------------------------------------------------------------------------------ scripts

@pytest.mark.slow   # trains
def test_pretrain_smoke_files_logs_and_falling_loss(pretrained):
    out, metrics, log = pretrained
    names = {p.name for p in out.iterdir()}
    assert {"pretrain_64.pth", "pretrain_64_resume.pth", "pretrain_64_log.csv", "pretrain_64_loss.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert "device cpu" in log and "step 5/40 | epoch 1/2 | loss" in log and "val_loss" in log
    assert all(k in log for k in ("lr ", "tok/s", "elapsed", "eta"))
    ck = safe_load(out / "pretrain_64.pth")
    assert ck["stage"] == "pretrain" and ck["config"]["hidden_size"] == 64
    assert not [k for k in ck["model"] if k.startswith(("module.", "_orig_mod."))]
    rows = trainer_utils.read_csv_rows(out / "pretrain_64_log.csv")
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert len(train) == 8 and train[-1] < train[0] - 1.0  # the loss goes down
    assert "epoch 2/2" in log and "step 40/40" in log
    assert [r["step"] for r in rows if r["val_loss"]] == ["20", "29", "40"]  # 29: the end of epoch 1
    assert metrics["steps"] == 40 and metrics["tokens"] == int(rows[-1]["tokens"]) and metrics["val_loss"] < 4.0
    resume = safe_load(out / "pretrain_64_resume.pth")
    assert resume["step"] == 40 and resume["finished"] and resume["run"]["stage"] == "pretrain"
    assert (out / "pretrain_64_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow   # trains
def test_sft_smoke_starts_from_pretrain(ws, pretrained, tmp_path, capsys):
    shutil.copy(pretrained[0] / "pretrain_64.pth", tmp_path)
    metrics = train_sft.main(sft_argv(ws, tmp_path, "--epochs", 2, "--max_steps", 30))
    log = capsys.readouterr().out
    assert "pretrain_64.pth" in log and "step 30/30" in log
    ck = safe_load(tmp_path / "full_sft_64.pth")
    assert ck["stage"] == "sft" and ck["from_weight"] == "pretrain"
    for f in ("full_sft_64_resume.pth", "full_sft_64_log.csv", "full_sft_64_loss.png"):
        assert (tmp_path / f).is_file()
    rows = trainer_utils.read_csv_rows(tmp_path / "full_sft_64_log.csv")
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert train[-1] < train[0] and metrics["val_loss"] is not None


@pytest.mark.slow   # trains
def test_resume_is_bitwise_exact(ws, tmp_path, monkeypatch):
    # 2 epochs x 15 steps (accumulation 2), interrupted by Ctrl-C in the middle of epoch 2.
    argv = ["--epochs", 2, "--accumulation_steps", 2, "--save_interval", 7, "--log_interval", 3]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    m1, _ = quiet(train_pretrain.main, pretrain_argv(ws, straight, *argv))
    assert m1["steps"] == 30

    code = run_interrupted(monkeypatch, 20, train_pretrain.main, pretrain_argv(ws, cut, *argv))
    assert code == 130
    assert safe_load(cut / "pretrain_64_resume.pth")["step"] == 20

    m2, log = quiet(train_pretrain.main, pretrain_argv(ws, cut, *argv, "--from_resume", 1))
    assert "resumed from" in log and "at step 20/30" in log and m2["steps"] == 30
    assert_bitwise_equal(weights(straight / "pretrain_64.pth"), weights(cut / "pretrain_64.pth"))
    # the epoch-1 held-out loss came through the resume file: the same per-epoch losses and verdict
    assert m2["epoch_val_losses"] == m1["epoch_val_losses"] and len(m1["epoch_val_losses"]) == 2
    assert m2["plateau"] == m1["plateau"]
    steps = [int(r["step"]) for r in trainer_utils.read_csv_rows(cut / "pretrain_64_log.csv") if r["train_loss"]]
    assert steps == list(range(3, 31, 3))  # every interval once, none twice across the interruption


@pytest.mark.slow   # needs the pretraining run
def test_resume_refuses_another_run(ws, pretrained, tmp_path, capsys):
    for f in ("pretrain_64.pth", "pretrain_64_resume.pth"):
        shutil.copy(pretrained[0] / f, tmp_path)
    before = snapshot(tmp_path)
    base = pretrain_argv(ws, tmp_path, "--max_steps", 40, "--from_resume", 1)
    expect_user_error(capsys, train_pretrain.main, base + ["--learning_rate", "1e-3"],
                      "different run", "learning_rate", "--from_resume 0")
    expect_user_error(capsys, train_pretrain.main, base + ["--num_hidden_layers", "3"],
                      "another model config", "num_hidden_layers")
    assert snapshot(tmp_path) == before


@pytest.mark.slow   # trains
def test_atomic_save_failure_keeps_previous_file(ws, pretrained, tmp_path, monkeypatch, capsys):
    shutil.copy(pretrained[0] / "pretrain_64.pth", tmp_path)
    before = (tmp_path / "pretrain_64.pth").read_bytes()

    def broken_save(obj, f, *a, **k):  # writes half a file, then the disk "fills up"
        Path(f).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    expect_user_error(capsys, train_pretrain.main, pretrain_argv(ws, tmp_path, "--max_steps", 3),
                      "could not write", "unchanged")
    assert (tmp_path / "pretrain_64.pth").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow   # trains
def test_nan_loss_stops_and_keeps_last_good_checkpoint(ws, tmp_path, monkeypatch, capsys):
    from model import model as model_mod

    real_forward, calls = model_mod.TinyMindForCausalLM.forward, {"n": 0}

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        calls["n"] += 1
        return out._replace(loss=out.loss * float("nan")) if calls["n"] >= 7 else out

    monkeypatch.setattr(model_mod.TinyMindForCausalLM, "forward", forward)
    expect_user_error(capsys, train_pretrain.main, pretrain_argv(ws, tmp_path, "--max_steps", 12,
                                                                 "--save_interval", 3),
                      "loss is nan at step 7", "last good checkpoint (step 6)")
    resume = safe_load(tmp_path / "pretrain_64_resume.pth")
    assert resume["step"] == 6
    saved = weights(tmp_path / "pretrain_64.pth")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert_bitwise_equal({k: saved[k] for k in resume["model"]}, resume["model"])


@pytest.mark.slow   # needs the pretraining run
def test_bad_input_exits_2_and_overwrites_nothing(ws, pretrained, tmp_path, capsys):
    for f in ("pretrain_64.pth", "pretrain_64_resume.pth", "pretrain_64_log.csv"):
        shutil.copy(pretrained[0] / f, tmp_path)
    before = snapshot(tmp_path)
    pre = pretrain_argv(ws, tmp_path, "--max_steps", 2)
    expect_user_error(capsys, train_pretrain.main, pre + ["--data_path", str(tmp_path / "nope.jsonl")],
                      "--data_path", "not found")
    expect_user_error(capsys, train_pretrain.main, pre + ["--preset", "huge"], "unknown preset", "smoke")
    sft = sft_argv(ws, tmp_path, "--max_steps", 2)
    expect_user_error(capsys, train_sft.main, sft + ["--from_weight", "nothere"], "nothere", "pretrain_64")
    expect_user_error(capsys, train_sft.main, sft + ["--num_hidden_layers", "3"],
                      "num_hidden_layers=3", "pretrain_64.pth")
    expect_user_error(capsys, train_sft.main, sft + ["--data_path", str(tmp_path / "nope.jsonl")], "not found")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, argv: list, report_dir: str):
    """One rank of a CPU/Gloo DDP run; records every file write it attempts."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    writes = []
    real_atomic, real_csv, real_save = train_loop.atomic_save, train_loop.write_csv_rows, train_pretrain.save_model
    train_loop.atomic_save = lambda obj, path: (writes.append(str(path)), real_atomic(obj, path))[1]
    train_loop.write_csv_rows = lambda path, *a, **k: (writes.append(str(path)), real_csv(path, *a, **k))[1]
    train_pretrain.save_model = lambda m, path, **k: (writes.append(str(path)), real_save(m, path, **k))[1]
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        metrics = train_pretrain.main(argv)
    report = {"final_loss": metrics["final_loss"], "val_loss": metrics["val_loss"], "steps": metrics["steps"],
              "tokens": metrics["tokens"], "writes": writes, "log": buf.getvalue()}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow   # trains in two processes
def test_ddp_two_processes_match_one(ws, tmp_path):
    import torch.multiprocessing as mp

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_steps", 10, "--eval_interval", 5, "--save_interval", 5]
    m1, _ = quiet(train_pretrain.main, pretrain_argv(ws, one, *common, "--batch_size", 8))
    # the cache exists now, so the ranks only read it
    mp.spawn(_ddp_worker, args=(2, _free_port(), pretrain_argv(ws, two, *common, "--batch_size", 4), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["writes"] == [] and r1["log"].count("step ") == 0  # only rank 0 writes and logs
    assert any(w.endswith("pretrain_64.pth") for w in r0["writes"]) and "DDP rank 0/2 (gloo)" in r0["log"]
    assert r0["steps"] == r1["steps"] == 10 and r0["tokens"] == m1["tokens"]
    assert r0["final_loss"] == pytest.approx(m1["final_loss"], rel=1e-4)
    assert r0["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4) and r1["val_loss"] == r0["val_loss"]
    a, b = weights(one / "pretrain_64.pth"), weights(two / "pretrain_64.pth")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
