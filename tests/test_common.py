"""model/common.py: path resolution, atomic saves and safe loads."""
import os
import pickle

import pytest
import torch

from model.common import ROOT, TinyMindError, atomic_save, repo_path, run_main, safe_load


def test_repo_path_resolves_from_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_path("out/x.pth") == ROOT / "out" / "x.pth"
    assert repo_path(tmp_path / "a") == tmp_path / "a"


def test_atomic_save_keeps_old_file_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_save({"w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(safe_load(path)["w"], torch.ones(3))
    assert not (tmp_path / "ckpt.pth.tmp").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_load_refuses_bad_files(tmp_path):
    with pytest.raises(TinyMindError, match="not found"):
        safe_load(tmp_path / "missing.pth")
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(TinyMindError, match="text.pth"):
        safe_load(text)
    good = tmp_path / "good.pth"
    atomic_save({"w": torch.arange(1000.0)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(TinyMindError, match="cut.pth"):
        safe_load(cut)
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"x": evil}, f)
    with pytest.raises(TinyMindError, match="evil.pth"):
        safe_load(bad)
    assert not (tmp_path / "pwned").exists()
    lst = tmp_path / "list.pth"
    torch.save([1, 2], lst)
    with pytest.raises(TinyMindError, match="not dict"):
        safe_load(lst)


def test_run_main_turns_user_errors_into_exit_2(capsys):
    def main(argv):
        raise TinyMindError("data.jsonl line 3: bad JSON")

    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: data.jsonl line 3: bad JSON"
