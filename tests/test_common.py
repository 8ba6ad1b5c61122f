"""model/common.py: path resolution, atomic saves and safe loads."""
import os
import pickle

import pytest
import torch

from model.common import ROOT, TinyMindError, atomic_save, repo_path, run_main, safe_load
from conftest import dev_script


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


# ---------------------------------------------------------------------------------------------------
# one rule, one place


def test_atomic_write_replaces_only_on_success(tmp_path):
    from model.common import atomic_write, atomic_write_text

    path = atomic_write_text(tmp_path / "sub" / "report.md", "good\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("crash mid-write")
    assert path.read_text(encoding="utf-8") == "good\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def _code_files():
    for folder in ("model", "trainer", "tools", "scripts", "dev", "dataset"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield ROOT / "eval_llm.py"


def _code_lines_matching(pattern, allowed=()):
    """'path:line: code' for every code line (comments stripped) of the project, model/common.py aside, that
    matches ``pattern``, unless (path, snippet) in ``allowed`` names it."""
    problems = []
    for path in _code_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "model/common.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not any(rel == f and snippet in code for f, snippet in allowed):
                problems.append(f"{rel}:{n}: {line.strip()}")
    return problems


def test_every_file_is_written_through_the_one_helper():
    """No module but model/common.py renames, torch.saves or writes a file itself; a temporary scratch
    file that never outlives its TemporaryDirectory is the only exception (the benchmark's corpus slice)."""
    import re

    allowed = {("dev/bench.py", "sliced.write_text("),  # a scratch file inside a TemporaryDirectory
               ("tools/measure.py", '"/proc/self/clear_refs"')}  # a kernel control file, not a file of ours
    writes = re.compile(r"os\.replace\(|\.replace\(path\)|torch\.save\(|\w+\.write_text\(|\.write_bytes\(|"
                        r"open\((?!tmp\b)[^)]*['\"][wa]b?['\"]|\.savefig\((?!tmp)")
    problems = _code_lines_matching(writes, allowed)
    assert not problems, "files written outside model.common.atomic_write:\n  " + "\n  ".join(problems)


def test_one_device_rule_and_one_checkpoint_rule_everywhere():
    """Every entry point picks its device with setup_device and finds checkpoints with find_checkpoint."""
    import re

    # a device check, or a search for a named checkpoint ({name}_*.pth, re.compile(name + ...pth))
    own_rules = re.compile(r"torch\.cuda\.is_available\(\)|backends\.mps\.is_available\(\)|"
                           r"glob\(f[\"'][^\"']*\{[^\"']*\.pth|re\.escape\([^)]*\)\s*\+[^\n]*pth")
    problems = _code_lines_matching(own_rules)
    assert not problems, "a device or checkpoint rule outside model/common.py:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("device", ["foo", "cuda"])
@pytest.mark.parametrize("script", ["eval_llm", "scripts.evaluate", "dev/bench.py", "trainer.train_pretrain",
                                    "trainer.train_sft", "trainer.train_lora"])
def test_bad_device_is_a_one_line_error_in_every_script(script, device, tmp_path, capsys):
    import importlib

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    main = dev_script("bench").main if script == "dev/bench.py" else importlib.import_module(script).main
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--device", device, "--save_dir", str(tmp_path)] if script != "dev/bench.py"
                 else ["--device", device, "--quick", "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device"), err


def test_weights_digest_sees_one_flipped_bit(tmp_path):
    """dev/weights_digest.py: the proof that a refactor leaves training bit-identical."""
    folder_digests = dev_script("weights_digest").folder_digests

    w = torch.randn(4, 4)
    atomic_save({"model": {"w": w}, "step": 3}, tmp_path / "a_64.pth")
    before = folder_digests(tmp_path)
    flipped = w.clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # the lowest mantissa bit of one number
    atomic_save({"model": {"w": flipped}, "step": 3}, tmp_path / "a_64.pth")
    assert folder_digests(tmp_path) != before
    atomic_save({"model": {"w": w}, "step": 3}, tmp_path / "a_64.pth")
    assert folder_digests(tmp_path) == before
