"""What every TinyMind entry point shares.

- ``ROOT`` and ``repo_path``: relative paths resolve from the repository root, never from the
  current directory, so ``python trainer/train_lora.py`` and ``cd trainer && python train_lora.py``
  read and write the same files.
- ``TinyMindError`` and ``run_main``: a user mistake (missing file, malformed data line, bad flag,
  a checkpoint for another model) is raised as ``TinyMindError`` and printed as one line with exit
  status 2 -- no traceback.
- ``atomic_save`` / ``safe_load``: every file we write goes to ``*.tmp`` first and is moved into
  place with ``os.replace``, so an interrupted save never destroys the previous good file; every file
  we read goes through ``torch.load(..., weights_only=True)``, which refuses pickles that run code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class TinyMindError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def repo_path(path: str | os.PathLike) -> Path:
    """Absolute paths stay as they are; relative ones are taken from the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def run_main(main, argv=None):
    """Run a script's ``main(argv)``; turn ``TinyMindError`` into ``error: ...`` and exit 2."""
    try:
        return main(argv)
    except TinyMindError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path + '.tmp'``, then ``os.replace`` it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def safe_load(path: str | os.PathLike, what: str = "checkpoint", map_location="cpu") -> dict:
    """Load a file written by ``atomic_save``; any failure becomes one clear ``TinyMindError``."""
    path = Path(path)
    if not path.is_file():
        raise TinyMindError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, plain text, or a pickle asking for arbitrary code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyMindError(f"{path} is not a readable {what} ({type(e).__name__}: {first[:160]})") from None
    if not isinstance(obj, dict):
        raise TinyMindError(f"{path} is not a TinyMind {what} (top level is {type(obj).__name__}, not dict)")
    return obj


def find_checkpoint(save_dir, name: str, hidden_size: int | None = None, what: str = "checkpoint") -> Path:
    """Resolve ``{save_dir}/{name}_{hidden}.pth`` (MiniMind's naming).

    With ``hidden_size=None`` the one file matching ``{name}_*.pth`` is taken. A missing file is a
    user mistake: the message lists the names that do exist, so a typo is easy to spot.
    """
    save_dir = repo_path(save_dir)
    if hidden_size is not None:
        path = save_dir / f"{name}_{hidden_size}.pth"
        if path.is_file():
            return path
    else:
        found = sorted(p for p in save_dir.glob(f"{name}_*.pth") if p.stem[len(name) + 1:].isdigit())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TinyMindError(f"several {what}s named {name!r} in {save_dir} "
                                f"({', '.join(p.name for p in found)}); pick one with --hidden_size")
        path = save_dir / f"{name}_<hidden>.pth"
    have = sorted(p.stem for p in save_dir.glob("*.pth") if not p.stem.endswith("_resume")) if save_dir.is_dir() else []
    raise TinyMindError(f"{what} {path} not found; files in {save_dir}: {', '.join(have) or 'none'}")
