"""Bit-exact digests of every tensor in every checkpoint of a folder: proof that a change to the code
did not change what training produces.

``model.model.state_fingerprint`` rounds to bf16 on purpose (an fp32 model and its bf16 copy agree);
this script does not round: one flipped bit in any tensor of a file changes that file's digest.

    python scripts/run_pipeline.py --preset smoke --save_dir /tmp/a        # before a refactor
    python dev/weights_digest.py --save_dir /tmp/a --out /tmp/a.json
    python scripts/run_pipeline.py --preset smoke --save_dir /tmp/b        # after it
    python dev/weights_digest.py --save_dir /tmp/b --compare /tmp/a.json    # exit 1 on any difference
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import hashlib
import json

import torch

from model.common import TinyMindError, atomic_write_text, repo_path, run_main, safe_load


def tensor_digest(obj, h) -> None:
    """Feed every tensor under ``obj`` (nested dicts and lists) into ``h``: key path, dtype, shape, bytes."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            h.update(str(i).encode())
            tensor_digest(v, h)


def folder_digests(save_dir: Path) -> dict[str, str]:
    """{file name: 16 hex digits} for every ``*.pth`` in ``save_dir`` (weights, LoRA and resume files)."""
    out = {}
    for path in sorted(save_dir.glob("*.pth")):
        h = hashlib.sha256()
        tensor_digest(safe_load(path), h)
        out[path.name] = h.hexdigest()[:16]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Bit-exact tensor digests of the checkpoints in a folder.")
    p.add_argument("--save_dir", default="out", help="folder with *.pth files (relative to the repo root)")
    p.add_argument("--out", default="", help="also write the digests to this JSON file")
    p.add_argument("--compare", default="", help="a JSON file written by --out: exit 1 if any digest differs")
    args = p.parse_args(argv)
    save_dir = repo_path(args.save_dir)
    if not save_dir.is_dir():
        raise TinyMindError(f"--save_dir {args.save_dir}: no such folder")
    digests = folder_digests(save_dir)
    for name, d in digests.items():
        print(f"{d}  {name}")
    if args.out:
        atomic_write_text(repo_path(args.out), json.dumps(digests, indent=1) + "\n")
    if args.compare:
        ref_path = repo_path(args.compare)
        try:
            ref = json.loads(ref_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TinyMindError(f"--compare {args.compare}: not a digest file ({type(e).__name__})") from None
        differ = sorted(n for n in set(ref) | set(digests) if ref.get(n) != digests.get(n))
        print("identical" if not differ else f"DIFFERENT: {', '.join(differ)}")
        if differ:
            sys.exit(1)
    return digests


if __name__ == "__main__":
    run_main(main)
