"""Measuring tools: clocks, interleaved timing and memory peaks (dev/bench.py; dev/lora_experiments.py notes
each run's peak memory with them), and the seeded models, batches and steps dev/bench.py's measurements share.

- ``time_interleaved``: A B C A B C ... timing after a warm-up, so a busy machine slows every variant
  alike; ``sync`` waits for CUDA before reading the clock.
- ``build_model`` / ``random_batch`` / ``add_lora`` / ``make_train_step`` / ``greedy``: the same
  seeded models, batches, training steps and decoding for every variant.
- ``reset_peak_memory`` / ``current_memory_mb``: CUDA allocator stats, or the process's resident set on
  the CPU (Linux VmHWM / statm); ``peak_memory_mb`` comes from model/common.py.
- ``cpu_info``: the CPU's model name and whether it computes bf16 natively (what a timing depends on).
"""
import copy
import os
import platform
import statistics
import time

import torch

from model.common import DeviceContext, cpu_native_bf16, peak_memory_mb  # noqa: F401 (peak_memory_mb: bench)
from model.engine import generate
from model.model import TinyMindForCausalLM, get_config
from model.lora_fused import use_plain_loop
from model.model_lora import apply_lora, lora_modules
from trainer.train_loop import build_optimizer


def cpu_info() -> dict:
    """The CPU's model name (Linux /proc/cpuinfo, else what ``platform`` says) and which native bf16 flags
    it has: {"cpu": ..., "native_bf16": bool, "bf16_flags": [...]}."""
    fields = {}   # the first processor's fields ("model name", ...)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    found = cpu_native_bf16()   # the rule --dtype auto follows (model/common.py)
    return {"cpu": cpu, "native_bf16": bool(found), "bf16_flags": found}


def sync(device):
    """CUDA kernels run asynchronously: wait for them before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, repeats, device, warmup=1, clock=time.perf_counter):
    """Time each callable in ``fns`` (name -> fn) ``repeats`` times, interleaved, after ``warmup`` untimed calls.

    Interleaving (A B C A B C ...) spreads the noise of a shared machine over every variant instead of
    punishing whichever ran while a neighbour was busy. The order never lets a variant run twice in a
    row, where it could find its own weights still in the cache (flipping the order every round, A B | B A,
    did that to A and B in turn). Even so, on a shared 2-core machine two identical models timed this way
    read up to about 5% apart (``merged_forward`` times such a copy as its yardstick).
    Returns name -> list of seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    return times


def med(xs):
    return statistics.median(xs)


def build_model(preset, device, seed=0):
    torch.manual_seed(seed)  # every variant starts from the same weights
    return TinyMindForCausalLM(get_config(preset)).to(device)


def random_batch(vocab_size, batch_size, seq_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, seq_len), generator=g).to(device)  # (B, T), no special ids


def add_lora(model, rank, targets, random_b=False):
    """Wrap ``model`` in place; ``random_b`` makes the adapter non-zero so merging really changes W."""
    info = apply_lora(model, rank=rank, targets=targets)
    if random_b:
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return info


def unfused_copy(model):
    """A copy of ``model`` whose LoRA layers run ``LoRALinear.forward``'s plain loop instead of ``FusedLoRA``
    (model/lora_fused.py): the same function, timed beside the fused path."""
    loop = copy.deepcopy(model)
    use_plain_loop(m for _, m in lora_modules(loop))
    return loop


def make_train_step(model, batch, dtype=torch.float32):
    """One optimizer step on ``batch``: forward, backward, the trainers' AdamW over the parameters that train.
    ``dtype``: the autocast dtype, as the trainers' ``--dtype`` (float32: none).

    For LoRA only the adapters require grad, which is where its savings come from: no weight gradients
    (dW = dy^T x) and no AdamW moments for the frozen base weights.
    """
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    model.train()
    amp = DeviceContext(batch.device, dtype)   # the trainers' autocast rule

    def step():
        with amp.autocast():
            loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def greedy(model, prompt, new_tokens, use_cache):
    """Greedy decoding of exactly ``new_tokens`` tokens (EOS disabled so every run does the same work)."""
    with torch.inference_mode():
        out = generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, top_k=None, top_p=None,
                       eos_token_id=None, use_cache=use_cache)
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, expected {new_tokens}")
    return out


def reset_peak_memory(device):
    """Start the peak at the current usage (CUDA stats; Linux: writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak below then also covers the interpreter's start-up


def current_memory_mb(device):
    """Memory in use right now (CUDA allocated, CPU resident set); the peak where Linux's /proc is missing."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_memory_mb(device)
