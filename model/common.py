"""What every TinyMind entry point shares.

- ``ROOT`` and ``repo_path``: relative paths resolve from the repository root, never from the
  current directory, so ``python trainer/train_lora.py`` and ``cd trainer && python train_lora.py``
  read and write the same files.
- ``TinyMindError`` and ``run_main``: a user mistake (missing file, malformed data line, bad flag,
  a checkpoint for another model) is raised as ``TinyMindError`` and printed as one line with exit
  status 2 -- no traceback.
- ``atomic_write`` (and ``atomic_save`` / ``atomic_write_text`` on top of it): the one way TinyMind
  writes a file. The content goes to ``*.tmp`` first and is moved into place with ``os.replace``, so an
  interrupted write never destroys the previous good file.
- ``read_json``: a JSON object from a file (a folder's config.json, tokenizer_config.json ...), one-line errors.
- ``safe_load``: every checkpoint we read goes through ``torch.load(..., weights_only=True)``, which
  refuses pickles that run code.
- ``find_checkpoint``: the one rule that turns (save_dir, name, hidden size or none) into a file;
  ``checkpoint_names`` lists the names it would find for one hidden size.
- ``setup_device`` / ``DeviceContext``: the one rule that picks the device (cuda -> mps -> cpu), the
  autocast dtype and DDP, used by every script; ``native_bf16`` / ``cpu_native_bf16``: whether this
  CPU multiplies bf16 matrices natively, which decides what ``--dtype auto`` trains in on a CPU.
- ``peak_memory_mb``: the process's peak memory (CUDA max allocated, or the CPU's peak resident set),
  which train_lora.py reports and dev/bench.py measures.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

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


@contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; when the block ends without an error, move it over
    ``path`` with ``os.replace`` (atomic on POSIX). On an error the temporary file is removed and the
    old ``path``, if any, is untouched.

        with atomic_write(out / "report.md") as tmp:
            tmp.write_text(text, encoding="utf-8")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through ``atomic_write``."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) through ``atomic_write``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


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


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (``what`` names it when the file is missing); one-line errors."""
    if not path.is_file():
        raise TinyMindError(f"{what} not found: {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TinyMindError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TinyMindError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def find_checkpoint(save_dir, name: str, hidden_size: int | None = None, what: str = "checkpoint",
                    missing_ok: bool = False) -> Path | None:
    """Resolve ``{save_dir}/{name}_{hidden}.pth`` (MiniMind's naming): the one rule every script uses.

    With ``hidden_size=None`` the one file matching ``{name}_*.pth`` is taken (several: an error asking
    for --hidden_size). A missing file is a user mistake: the message lists the names that do exist, so
    a typo is easy to spot; with ``missing_ok=True`` it returns None instead.
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
    if missing_ok:
        return None
    have = sorted(p.stem for p in save_dir.glob("*.pth") if not p.stem.endswith("_resume")) if save_dir.is_dir() else []
    raise TinyMindError(f"{what} {path} not found; weights in {save_dir}: {', '.join(have) or 'none'}")


def checkpoint_names(save_dir, hidden_size: int) -> list[str]:
    """The names ``n`` that have a file ``{save_dir}/{n}_{hidden_size}.pth`` (resume files are not
    checkpoints): the inverse of ``find_checkpoint``, e.g. to offer every LoRA file of one model size."""
    save_dir = repo_path(save_dir)
    suffix = f"_{hidden_size}.pth"
    if not save_dir.is_dir():
        return []
    return sorted(p.name[: -len(suffix)] for p in save_dir.iterdir() if p.is_file() and p.name.endswith(suffix))


# ----------------------------------------------------------------------------------------------
# the one device rule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# CPU features (as /proc/cpuinfo names them) that multiply bf16 matrices natively: AVX512-BF16's dot
# products (AMD Zen 4+, Intel Cooper Lake+) and AMX's bf16 tiles (Intel Sapphire Rapids+). Without one, a
# bf16 matrix product is converted to fp32 and back around fp32 arithmetic: slower than plain fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16(flags) -> list[str]:
    """The native-bf16 features among a CPU's feature ``flags`` (/proc/cpuinfo spelling, any case), in
    ``NATIVE_BF16_FLAGS`` order; empty where bf16 would be emulated."""
    have = {f.lower() for f in flags}
    return [f for f in NATIVE_BF16_FLAGS if f in have]


def cpu_flags() -> set[str]:
    """This CPU's feature flags: Linux's /proc/cpuinfo (first processor), plus torch's own probes of the
    bf16 features, which also work where there is no /proc (macOS, Windows)."""
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((l for l in f if l.startswith("flags")), "")
        flags.update(line.partition(":")[2].split())
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, probe in probes.items():   # private helpers of torch.cpu: absent in some versions
        if getattr(torch.cpu, probe, lambda: False)():
            flags.add(flag)
    return flags


def cpu_native_bf16() -> list[str]:
    """The native-bf16 features of this CPU (``native_bf16`` of ``cpu_flags``); empty: bf16 is emulated."""
    return native_bf16(cpu_flags())


def cpu_bf16_path(found: list[str] | None = None) -> str:
    """How this CPU computes bf16, as one phrase for logs and the bench: "native bf16 (avx512_bf16)" or
    "no native bf16 (AVX2): bf16 is emulated". ``found``: ``cpu_native_bf16()`` if already known."""
    found = cpu_native_bf16() if found is None else found
    if found:
        return f"native bf16 ({', '.join(found)})"
    return f"no native bf16 ({torch.backends.cpu.get_cpu_capability()}): bf16 is emulated"


@dataclass
class DeviceContext:
    """Where and how a run computes; made by ``setup_device``."""

    device: torch.device
    dtype: torch.dtype = torch.float32  # autocast dtype; float32 means no autocast at all
    scaler: object | None = None  # a GradScaler, only for fp16 on CUDA (bf16 has fp32's exponent range)
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    reason: str = ""  # the one-line explanation that setup_device logged

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Context for forward passes: mixed precision on GPUs, a no-op in fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def log(self, msg: str) -> None:
        """Print on rank 0 only, so N processes do not print N copies."""
        if self.is_main:
            print(msg, flush=True)


def setup_device(device: str = "auto", dtype: str = "auto", log: bool = True,
                 inference: bool = False) -> DeviceContext:
    """Decide device, dtype and DDP in one place; log (rank 0) what was chosen and why. Every script
    (training, chat, evaluation, benchmark, conversion, server) calls this and nothing else.

    device: auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps. dtype: auto, float32, bfloat16, float16
    (auto: bf16 on a GPU that has it, else fp16; on a CPU bf16 for training where it has native bf16
    (``cpu_native_bf16``), else fp32, as for inference on a CPU and on MPS).
    Training: ``dtype`` is the autocast dtype. Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1)
    the process group is initialised here: NCCL when training on CUDA (each rank on cuda:LOCAL_RANK),
    Gloo on CPU.
    inference=True: ``dtype`` is what the weights are cast to (fp16 is then allowed on CPU too), and no
    process group is started.
    """
    world_size = 1 if inference else int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0 if inference else int(os.environ.get("RANK", "0"))
    local_rank = 0 if inference else int(os.environ.get("LOCAL_RANK", "0"))
    ddp = world_size > 1

    if device == "auto":
        if torch.cuda.is_available():
            dev, why = torch.device("cuda", local_rank if ddp else 0), "CUDA is available"
        elif torch.backends.mps.is_available() and not ddp:
            dev, why = torch.device("mps"), "Apple MPS is available, no CUDA"
        else:
            dev, why = torch.device("cpu"), "no CUDA or MPS found"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise TinyMindError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TinyMindError(f"--device {device}: CUDA is not available on this machine "
                                    "(this torch build sees no CUDA GPU; use --device cpu)")
            if ddp:  # torchrun gives every rank its own GPU
                dev = torch.device("cuda", local_rank)
            elif dev.index is None:
                dev = torch.device("cuda", 0)
            if dev.index >= torch.cuda.device_count():
                raise TinyMindError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        elif dev.type == "mps":
            if not torch.backends.mps.is_available():
                raise TinyMindError("--device mps: MPS is not available on this machine (use --device cpu)")
            if ddp:
                raise TinyMindError("--device mps cannot be used with torchrun (DDP); run one process")
        elif dev.type != "cpu":
            raise TinyMindError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
        why = "--device " + device

    if dtype == "auto":
        if dev.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            amp = torch.bfloat16 if bf16 else torch.float16
            dwhy = "GPU supports bf16" if bf16 else "GPU lacks bf16, fp16 with loss scaling"
        elif dev.type == "cpu" and not inference:
            # bf16 autocast pays only where the CPU multiplies bf16 natively (dev/bench.py's gemm_rate
            # compares the two rates); elsewhere it is emulated, slower than fp32, so those CPUs keep fp32
            found = cpu_native_bf16()
            amp = torch.bfloat16 if found else torch.float32
            dwhy = f"auto: this CPU has {cpu_bf16_path(found)}"
        else:
            amp, dwhy = torch.float32, f"auto: {dev.type.upper()} {'runs' if inference else 'trains'} in fp32"
    else:
        if dtype not in DTYPES:
            raise TinyMindError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
        amp, dwhy = DTYPES[dtype], "--dtype " + dtype
        if amp == torch.float16 and dev.type == "cpu" and not inference:
            raise TinyMindError("--dtype float16 needs a GPU; on CPU use float32 (or bfloat16)")
    scaler = None
    if amp == torch.float16 and dev.type == "cuda" and not inference:  # torch < 2.3 only has the torch.cuda.amp spelling
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()

    if ddp:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        mode = f"DDP rank {rank}/{world_size} ({dist.get_backend()})"
    else:
        mode = "single process"
    dname = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    reason = (f"device {dev}{dname} [{why}], dtype {str(amp)[6:]} [{dwhy}], {mode}")
    ctx = DeviceContext(dev, amp, scaler, ddp, rank, local_rank, world_size, reason)
    if log:
        ctx.log(reason)
    return ctx


def cleanup_distributed(ctx: DeviceContext) -> None:
    """Tear down the process group that ``setup_device`` started (no-op without DDP)."""
    if ctx.ddp and dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_mb(device) -> float:
    """Peak memory of this process in MB: CUDA max allocated, or the peak resident set size on the CPU.

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss survives fork + exec, so a child would start with
    its parent's peak (dev/bench.py runs each variant in a child process of a process holding models).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB -> MB
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:
        raise TinyMindError("peak memory on a CPU needs Linux's /proc or the POSIX 'resource' module") from None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere
