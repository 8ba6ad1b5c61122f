"""TinyMind performance bench: the speed and memory claims of the docs, measured on your machine.

Every claim is a ratio of two variants measured in one run on one machine: the two sides are timed
interleaved (A B A B ...) after a warm-up, and their medians are compared, so a busy machine slows both
sides alike. Measurements (names for ``--only``):

  lora_step         LoRA (r=8, all-linear) training step vs full fine-tuning step, same batch: speed-up
                    (also the LoRA step through LoRALinear's plain loop instead of FusedLoRA)
  lora_memory       the same two steps, peak memory above the warmed-up runtime, one fresh process per variant
                    (CPU: peak resident set, Linux VmHWM; CUDA: max allocated)
  merged_forward    forward of a model whose LoRA is merged into W vs the base model (beside it: an identical
                    copy of the base, timed in the same rounds, shows how far "the same work" reads from 1.00x)
  unmerged_forward  forward with the LoRA adapter unmerged (x (W + s B A)^T: FusedLoRA's no-gradient
                    form) vs the base model
  kv_cache          greedy decoding of N new tokens with the KV cache vs recomputing the whole prefix
  decode            decode tokens/s, batch 1, greedy, fp32 and bf16, as % of the machine's limit: the
                    torch.mv read rate (bytes/s, timed interleaved with the decode runs) / bytes of weights
                    read per token; also the step's matrix products alone
  packing           pretraining: useful (non-pad) tokens/s of the packed loader vs padding every document
  train             training tokens/s (full fine-tuning step) of the `tiny` and `small` presets
  train_compile     the same step under torch.compile (--use_compile 1) vs eager: speed-up and compile time
                    (not with --quick: compiling takes about a minute per model)
  qlora_memory      bytes of the frozen base stored for QLoRA (linear layers NF4 + double quantisation, tied
                    embedding bf16) vs the fp32 base, `small` preset (a count of stored bytes, not a timing)
  gemm_rate         GFLOP/s of the training step's own matrix products (`tiny`, batch 16x256: each linear
                    layer's forward product and its two backward ones), fp32 and bf16, and which bf16 path
                    ran (native: AVX512-BF16/AMX; else emulated)
  train_flop_share  the training step's FLOP rate (6 N per token + attention) as a % of that GEMM rate,
                    fp32 and bf16 autocast (the trainers' --dtype), timed interleaved with the products
                    (where bf16 is emulated its step is many times slower: minutes on a 2-core CPU)
  lora_135m         the LoRA step of a released model's shape (SmolLM2-135M: hidden 576, 30 layers, vocab
                    49152, shape-true random weights, r=16 on the 7 projections, batch 8 x 128): tokens/s,
                    the step's FLOPs (2 N forward + 2 N input gradients + 6 per adapter weight + attention)
                    as a % of the GEMM rate of its own products in its dtype, and peak memory (one fresh
                    process per variant). Variants: today's step (fp32 base, whole LM head), the chunked
                    head, + gradient checkpointing, and a bf16 base (bf16 autocast) with and without it;
                    the bf16 ones only where bf16 is native (or --real_bf16 1: emulated, many times slower).
                    Not in the default run (minutes on 2 cores): --only lora_135m (--quick: at toy sizes)

It prints a markdown table (PASS/MISS per target) and writes JSON with the machine, command and date.

CPU (a few minutes on 2 cores):
    python dev/bench.py
    python dev/bench.py --quick                    # every measurement at toy sizes, 10-40 s (CI)
    python dev/bench.py --only decode,kv_cache --repeats 5 --threads 2
    python dev/bench.py --threads 1 --timer cpu    # steadier ratios on a machine shared with other jobs
    python dev/bench.py --out docs/results/bench.json        # keep a result for the docs
    python dev/bench.py --render docs/results/bench.json     # its markdown table again, nothing measured
    python dev/bench.py --only lora_135m --threads 2 --out docs/results/bench_lora_135m.json   # docs/08
GPU (one device; the bench is single-process, so there is no torchrun/multi-GPU variant):
    python dev/bench.py --device cuda
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import subprocess
import tempfile
import time

import torch

from model.common import TinyMindError, atomic_write_text, cpu_bf16_path, repo_path, run_main, setup_device
from model.engine import decode_weights
from model.model import TinyMindForCausalLM, get_config
from model.model_lora import DEFAULT_TARGETS, merge_lora
from tools.measure import (add_lora, build_model, cpu_info, current_memory_mb, greedy, make_train_step, med,
                           peak_memory_mb, random_batch, reset_peak_memory, sync, time_interleaved, unfused_copy)
from trainer.train_loop import build_optimizer

MEASUREMENTS = ("lora_step", "lora_memory", "merged_forward", "unmerged_forward",
                "kv_cache", "decode", "packing", "train", "train_compile", "qlora_memory", "gemm_rate",
                "train_flop_share", "lora_135m")
DEFAULT_RUN = MEASUREMENTS[:-1]   # lora_135m builds a 135M model per variant: only with --only (or --quick)

# Targets from the performance issue: (comparison, threshold). "within" means |value - 1| <= threshold.
TARGETS = {
    "lora_step": (">=", 1.3),
    "lora_memory": ("<=", 0.7),
    "merged_forward": ("within", 0.03),
    "unmerged_forward": ("<=", 1.10),
    "kv_cache": (">=", 5.0),
    "decode": (">=", 60.0),        # % of the machine's limit: torch.mv read rate / weight bytes per token
    "decode_bf16": (">=", 60.0),
    "packing": (">=", 1.5),
    "train_compile_tiny": (">=", 1.2),     # training tokens/s >= 1.2x: here through --use_compile 1
    "train_compile_small": (">=", 1.2),
    "qlora_memory": ("<=", 0.2),
    "lora_135m_share_fp32": (">=", 60.0),   # % of the GEMM rate for the step's dtype
    "lora_135m_share_bf16": (">=", 60.0),   # judged only where bf16 is native (else the row is *_emulated)
}


# ----------------------------------------------------------------------------------------------------
# the measurements: each takes the run context and returns (rows, details)

class Ctx:
    """What every measurement needs: the parsed flags, the device, the sizes and a memo shared across them."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        q = args.quick
        self.preset = args.preset or ("smoke" if q else "small")
        self.train_presets = ("smoke", "tiny") if q else ("tiny", "small")
        self.packing_preset = args.packing_preset or ("smoke" if q else "tiny")
        self.flop_preset = self.train_presets[0]   # gemm_rate / train_flop_share: `tiny` (smoke with --quick)
        self.flop_batch = args.batch_size or (2 if q else 16)   # the trainers' default batch of 16 x 256
        self.batch_size = args.batch_size or (2 if q else (4 if device.type == "cpu" else 16))
        self.seq_len = args.seq_len or (64 if q else 256)
        self.new_tokens = args.new_tokens or (24 if q else 256)
        self.repeats = args.repeats or (1 if q else 5)
        self.corpus_docs = args.corpus_docs or (200 if q else 2000)
        self.clock = time.process_time if args.timer == "cpu" else time.perf_counter
        self.memo = {}

    def time(self, fns, repeats=None, warmup=1):
        """``time_interleaved`` on this run's device and clock; ``repeats`` defaults to ``--repeats``."""
        return time_interleaved(fns, self.repeats if repeats is None else repeats, self.device, warmup, self.clock)

    @property
    def shape(self):
        return f"{self.batch_size}x{self.seq_len}"


def row(name, what, value, result, unit):
    """One table line; ``main`` fills in its target and PASS/MISS."""
    return {"name": name, "what": what, "value": float(value), "unit": unit, "result": result}


def bench_lora_step(ctx):
    a = ctx.args
    base = build_model(ctx.preset, ctx.device)
    batch = random_batch(base.config.vocab_size, ctx.batch_size, ctx.seq_len, ctx.device)
    lora = copy.deepcopy(base)
    info = add_lora(lora, a.lora_rank, a.lora_targets)
    times = ctx.time({"full": make_train_step(base, batch), "lora": make_train_step(lora, batch),
                      "lora_loop": make_train_step(unfused_copy(lora), batch)})
    ctx.memo[("full_step", ctx.preset)] = times["full"]  # reused by the `train` measurement
    full, lo, lp = med(times["full"]), med(times["lora"]), med(times["lora_loop"])
    what = f"LoRA step vs full FT step ({ctx.preset}, r={a.lora_rank} {a.lora_targets}, batch {ctx.shape})"
    rows = [row("lora_step", what, full / lo, f"{full / lo:.2f}x faster (LoRA {lo:.3f} s vs full {full:.3f} s; "
                                              f"unfused loop {lp:.3f} s = {full / lp:.2f}x)", "x")]
    details = {"preset": ctx.preset, "batch": [ctx.batch_size, ctx.seq_len], "full_s": times["full"],
               "lora_s": times["lora"], "lora_loop_s": times["lora_loop"], "trainable": info["trainable"],
               "total": info["total"]}
    return rows, details


def memory_worker(args):
    """Hidden ``--_worker``: one training variant in a fresh process, its peak memory printed as JSON.

    A fresh process per variant because the CPU's peak RSS is a high-water mark: once one variant has
    run in a process, the other could never show a lower peak.
    """
    variant = args._worker
    device = torch.device(args.device)
    # Warm the runtime first: the first model and training step page in code and allocate torch's one-time
    # state (~90 MB on a CPU), which belongs to the runtime, not to either variant.
    warm = build_model("smoke", device)
    make_train_step(warm, random_batch(warm.config.vocab_size, 1, 8, device))()
    del warm
    gc.collect()
    before_model = current_memory_mb(device)  # Python + warmed torch runtime, none of the measured tensors
    reset_peak_memory(device)  # the peak starts here: no transient of the imports or the warm-up counts
    model = build_model(args.preset, device)
    if variant == "lora":
        add_lora(model, args.lora_rank, args.lora_targets)
    after_model = current_memory_mb(device)
    batch = random_batch(model.config.vocab_size, args.batch_size, args.seq_len, device)
    step = make_train_step(model, batch)
    for _ in range(3):  # AdamW creates its moments in step 1: steps 2-3 hold weights+grads+moments+activations
        step()
    print(json.dumps({"variant": variant, "before_model_mb": before_model, "after_model_mb": after_model,
                      "peak_mb": peak_memory_mb(device)}))


def start_worker(ctx, worker: str, *flags: str) -> subprocess.Popen:
    """A fresh ``--_worker`` process of this script (its own peak memory), on this run's device and threads."""
    # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so without this the peak
    # RSS measures fragmentation (~1 GB for both variants of `small`) rather than the tensors alive at the
    # peak. A fixed 64 KiB threshold hands every tensor-sized block back to the OS when it is freed, so RSS
    # follows live memory, the CPU counterpart of CUDA's max_memory_allocated. Other C libraries ignore it.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", worker, "--device", str(ctx.device),
           "--threads", str(torch.get_num_threads()), *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def worker_result(worker: str, proc: subprocess.Popen) -> dict:
    """The JSON line a worker printed last, once it has finished."""
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker '{worker}' failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_memory_workers(ctx):
    """Run one ``--_worker`` process per variant, side by side (they measure memory, not time)."""
    a = ctx.args
    flags = ("--preset", ctx.preset, "--batch_size", str(ctx.batch_size), "--seq_len", str(ctx.seq_len),
             "--lora_rank", str(a.lora_rank), "--lora_targets", a.lora_targets)
    procs = {variant: start_worker(ctx, variant, *flags) for variant in ("full", "lora")}
    return {variant: worker_result(variant, proc) for variant, proc in procs.items()}


def bench_lora_memory(ctx):
    workers = run_memory_workers(ctx)
    full, lora = workers["full"], workers["lora"]
    # Headline: peak minus the process's memory just before the model was built, i.e. what training holds
    # (weights, gradients, AdamW moments, activations) without the Python + torch runtime (~0.3 GB of code,
    # libraries and one-time state) that both processes carry. On CUDA: max_memory_allocated, same baseline.
    used = {v: d["peak_mb"] - d["before_model_mb"] for v, d in (("full", full), ("lora", lora))}
    extra = {v: d["peak_mb"] - d["after_model_mb"] for v, d in (("full", full), ("lora", lora))}
    ratio, ratio_extra = used["lora"] / used["full"], extra["lora"] / max(extra["full"], 1e-9)
    how = "max allocated" if ctx.device.type == "cuda" else "peak RSS above the runtime"
    what = f"LoRA peak memory vs full FT ({ctx.preset}, batch {ctx.shape}, {how})"
    rows = [row("lora_memory", what, ratio, f"{ratio:.2f}x (LoRA {used['lora']:.0f} MB vs full {used['full']:.0f} MB; "
                f"{ratio_extra:.2f}x without the weights)", "x")]
    details = {"full": full, "lora": lora, "used_mb": used, "above_weights_mb": extra,
               "ratio_above_weights": ratio_extra, "ratio_raw_peak": lora["peak_mb"] / full["peak_mb"],
               "note": "value = (peak - memory before the model) ratio; ratio_above_weights subtracts the memory "
                       "after model creation (weights identical in both), ratio_raw_peak subtracts nothing"}
    return rows, details


def forward_times(ctx):
    """Base, merged-LoRA and unmerged-LoRA forward, timed together (shared by two measurements)."""
    if "forward" in ctx.memo:
        return ctx.memo["forward"]
    a = ctx.args
    base = build_model(ctx.preset, ctx.device).eval()
    unmerged = copy.deepcopy(base)
    add_lora(unmerged, a.lora_rank, a.lora_targets, random_b=True)
    merged = merge_lora(copy.deepcopy(unmerged)).eval()
    unmerged.eval()
    loop = unfused_copy(unmerged)   # x W^T + s (x A^T) B^T, LoRALinear's plain loop, for comparison
    batch = random_batch(base.config.vocab_size, ctx.batch_size, ctx.seq_len, ctx.device)

    def fwd(m):
        def f():
            with torch.inference_mode():
                return m(batch).logits
        return f
    # Same function either way: merged and unmerged must give the same logits, or we time the wrong thing.
    diff = max((fwd(merged)() - fwd(m)()).abs().max().item() for m in (unmerged, loop))
    # A forward is short: twice the rounds for a tighter median.
    # base_copy: an identical copy of the base, timed in the same rounds: what "the same work" reads on this
    # machine (memory placement and noise), the yardstick for the 1.00x of a merged model.
    times = ctx.time({"base": fwd(base), "merged": fwd(merged), "unmerged": fwd(unmerged), "unmerged_loop": fwd(loop),
                      "base_copy": fwd(copy.deepcopy(base))}, 2 * ctx.repeats + 1)
    ctx.memo["forward"] = (times, diff)
    return ctx.memo["forward"]


def bench_forward(ctx, variant):
    times, diff = forward_times(ctx)
    b, v = med(times["base"]), med(times[variant])
    a = ctx.args
    what = f"{variant}-LoRA forward vs base ({ctx.preset}, r={a.lora_rank} {a.lora_targets}, batch {ctx.shape})"
    result = f"{v / b:.3f}x ({variant} {v * 1e3:.1f} ms vs base {b * 1e3:.1f} ms"
    details = {"base_s": times["base"], f"{variant}_s": times[variant], "merged_vs_unmerged_max_abs_diff": diff}
    if variant == "unmerged":
        lp = med(times["unmerged_loop"])
        result += f"; unfused loop {lp / b:.3f}x"
        details["unmerged_loop_s"] = times["unmerged_loop"]
    else:
        c = med(times["base_copy"])
        result += f"; an identical copy of the base {c / b:.3f}x"
        details["base_copy_s"] = times["base_copy"]
    return [row(f"{variant}_forward", what, v / b, result + ")", "x")], details


def decode_setup(ctx, dtype=torch.float32):
    model = build_model(ctx.preset, ctx.device).eval().to(dtype)
    prompt = random_batch(model.config.vocab_size, 1, ctx.args.prompt_len, ctx.device)  # (1, T_prompt)
    return model, prompt


def bench_kv_cache(ctx):
    model, prompt = decode_setup(ctx)
    times = ctx.time({"cached": lambda: greedy(model, prompt, ctx.new_tokens, use_cache=True)})["cached"]
    tokens = greedy(model, prompt, ctx.new_tokens, use_cache=True)
    # Without the cache every step re-runs the whole prefix: O(N^2) work, so one run is enough (and long).
    sync(ctx.device)
    t0 = ctx.clock()
    plain = greedy(model, prompt, ctx.new_tokens, use_cache=False)
    sync(ctx.device)
    uncached, cached = ctx.clock() - t0, med(times)
    what = f"greedy decode, KV cache vs none ({ctx.preset}, batch 1, {ctx.new_tokens} new tokens)"
    rows = [row("kv_cache", what, uncached / cached,
                f"{uncached / cached:.1f}x faster (cached {cached:.2f} s vs uncached {uncached:.2f} s)", "x")]
    return rows, {"cached_s": times, "uncached_s": [uncached], "uncached_runs": 1,
                  "tokens_identical": bool(torch.equal(tokens, plain))}


def decode_bytes_per_token(model):
    """Bytes of weights one decoding step reads: every linear matrix of the blocks, the LM head (a tied
    embedding is read once, as the head) and one embedding row for the lookup, in the model's dtype."""
    core = model.model
    elems = sum(m.weight.numel() for m in core.layers.modules() if isinstance(m, torch.nn.Linear))
    elems += model.lm_head.weight.numel() + model.config.hidden_size
    return elems * model.lm_head.weight.element_size()


def limit_reads(model, n_bytes, device, reads):
    """(fn, bytes per call): fn runs ``reads`` ``torch.mv`` products over one (rows, hidden) matrix of at least
    ``n_bytes`` (the weights a decoding step reads), in the model's dtype, so it streams from memory as
    decoding does. Timed interleaved with the decode runs (``reads`` = tokens decoded per run), its median
    gives the machine's matrix-vector read rate over the same moments as the decode rate it is compared with."""
    width, dtype = model.config.hidden_size, model.lm_head.weight.dtype
    rows = -(-n_bytes // (width * torch.finfo(dtype).bits // 8))   # ceil
    g = torch.Generator().manual_seed(0)
    W = torch.randn(rows, width, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(width, generator=g).to(device=device, dtype=dtype)

    def fn():
        with torch.inference_mode():
            for _ in range(reads):
                torch.mv(W, x)
    return fn, reads * W.numel() * W.element_size()


def decode_row(name, what, tps, limit, extra=""):
    pct = 100.0 * tps / limit
    return row(name, what, pct, f"{tps:.1f} tok/s = {pct:.0f}% of limit {limit:.0f} tok/s{extra}", "% of limit")


def products_only_fn(ctx, model):
    """``--new_tokens`` decoding steps that do nothing but the step's matrix products (the fused matrices
    of ``model/engine.py``, one row): how close to the limit decoding could get if every other
    operation (norms, RoPE, attention, sampling, Python) cost nothing."""
    w, cfg = decode_weights(model), model.config
    dtype = model.lm_head.weight.dtype
    x = torch.randn(1, cfg.hidden_size, device=ctx.device).to(dtype)
    h = torch.randn(1, cfg.intermediate_size, device=ctx.device).to(dtype)

    def steps():
        with torch.inference_mode():
            for _ in range(ctx.new_tokens):
                for lw in w.layers:
                    x @ lw.qkv, x @ lw.o, x @ lw.gate_up, h @ lw.down
                x @ w.head
    return steps


def bench_decode(ctx):
    rows, details = [], {"new_tokens": ctx.new_tokens, "prompt_len": ctx.args.prompt_len,
                         "limit_rule": "limit tok/s = torch.mv read rate / bytes of weights read per token; the "
                                       "rate: --new_tokens mv products over one matrix at least as large as the "
                                       "weights a step reads, timed interleaved with the decode runs (median)"}
    # bf16 halves the bytes read per token; CPUs without native bf16 (no AVX512-BF16/AMX) convert on the fly,
    # which its own mv limit measures too.
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model, prompt = decode_setup(ctx, dtype)
        n_bytes = decode_bytes_per_token(model)
        limit_fn, limit_bytes = limit_reads(model, n_bytes, ctx.device, ctx.new_tokens)
        # decoding, its matrix products alone and the limit's reads, timed interleaved: one set of moments
        times = ctx.time({"decode": lambda: greedy(model, prompt, ctx.new_tokens, True),
                          "products": products_only_fn(ctx, model), "limit": limit_fn})
        tps, ptps = ctx.new_tokens / med(times["decode"]), ctx.new_tokens / med(times["products"])
        rate = limit_bytes / med(times["limit"])                        # bytes/s that torch.mv reads
        limit = rate / n_bytes                                          # tok/s if a step only read its weights
        extra = f"; its matrix products alone: {ptps:.0f} tok/s = {100 * ptps / limit:.0f}%"
        if key == "bf16":
            extra = f" ({tps / details['fp32_tok_s']:.2f}x fp32){extra}"
        what = f"decode tokens/s ({ctx.preset}, batch 1, {ctx.new_tokens} new tokens, {key}, KV cache)"
        rows.append(decode_row("decode" if key == "fp32" else "decode_bf16", what, tps, limit, extra))
        details.update({f"{key}_s": times["decode"], f"{key}_tok_s": tps, f"{key}_products_only_s": times["products"],
                        f"{key}_products_only_tok_s": ptps, f"{key}_limit_reads_s": times["limit"],
                        f"{key}_limit": {"bytes_per_token": n_bytes, "mv_bytes_per_s": rate,
                                         "limit_tok_s": limit}})
    return rows, details


def padded_samples(docs, tokenizer, max_seq_len):
    """The naive pretraining loader: one sample per document, padded to max_seq_len, labels -100 on pads."""
    samples = []
    for line in docs:
        text = json.loads(line)["text"]
        ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][:max_seq_len]  # as PretrainDataset
        pad = max_seq_len - len(ids)
        samples.append((torch.tensor(ids + [tokenizer.pad_id] * pad), torch.tensor(ids + [-100] * pad)))
    return samples


def bench_packing(ctx):
    from dataset.lm_dataset import PretrainDataset  # imported here so the other measurements never need data
    from model.tokenizer import load_tokenizer
    a = ctx.args
    corpus = repo_path(a.corpus)
    if not corpus.is_file():
        raise TinyMindError(f"--corpus {corpus} not found")
    T, B, steps = ctx.seq_len, ctx.batch_size, a.packing_steps
    with tempfile.TemporaryDirectory() as tmp:
        # Both loaders read the same slice of the corpus (the first --corpus_docs documents).
        with open(corpus, encoding="utf-8") as f:
            docs = list(itertools.islice((line for line in f if line.strip()), ctx.corpus_docs))
        sliced = Path(tmp) / "corpus.jsonl"
        sliced.write_text("".join(docs), encoding="utf-8")
        n = len(docs)
        tok = load_tokenizer(a.tokenizer)
        try:
            packed = PretrainDataset(str(sliced), tok, max_seq_len=T, cache_dir=tmp)
        except TinyMindError as e:  # name the user's file and flags, not our temporary slice
            msg = str(e).replace(f"{sliced}: ", "")
            raise TinyMindError(f"--corpus {a.corpus} with --corpus_docs {ctx.corpus_docs}: {msg}") from None
        padded = padded_samples(docs, tok, T)
        need = B * steps
        if len(packed) < need or len(padded) < need:
            raise TinyMindError(f"--corpus_docs {ctx.corpus_docs} gives {len(packed)} packed / {len(padded)} padded "
                                f"samples; need {need} (= batch {B} x --packing_steps {steps}): raise --corpus_docs")
        loaders = {name: torch.utils.data.DataLoader(ds, batch_size=B, shuffle=False, drop_last=True)
                   for name, ds in (("packed", packed), ("padded", padded))}
        # Each variant trains its own copy of the same model: a step costs the same (B x T either way),
        # what differs is how many of those B*T positions are real text (labels != -100).
        models = {name: build_model(ctx.packing_preset, ctx.device).train() for name in loaders}
        opts = {name: build_optimizer(m, lr=1e-4, weight_decay=0.1) for name, m in models.items()}

        def first_steps(name):
            """``steps`` training steps on the loader's first batches; the loader's own time counts too."""
            for _, (x, y) in zip(range(steps), loaders[name]):
                x, y = x.to(ctx.device), y.to(ctx.device)
                models[name](x, labels=y).loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)

        times = ctx.time({name: (lambda name=name: first_steps(name)) for name in loaders})
        # Real tokens per batch, averaged over the whole slice (not just the few batches timed).
        fill = {name: sum(int((y != -100).sum()) for _, y in ds) / (len(ds) * T)
                for name, ds in (("packed", packed), ("padded", padded))}
        rate = {name: fill[name] * B * T * steps / med(times[name]) for name in loaders}
        n_packed = len(packed)
        del loaders, packed  # release the token cache's memmap before its folder is removed
    ratio = rate["packed"] / rate["padded"]
    what = f"pretrain useful tokens/s, packed vs padded to {T} ({ctx.packing_preset}, batch {B}, {n} docs)"
    rows = [row("packing", what, ratio,
                f"{ratio:.2f}x ({rate['packed']:.0f} vs {rate['padded']:.0f} useful tok/s)", "x")]
    details = {"useful_tokens_per_s": rate, "round_s": times, "steps_per_round": steps, "fill": fill,
               "padded_fill": fill["padded"], "docs": n, "packed_samples": n_packed, "padded_samples": len(padded),
               "truncated_docs": sum(int(y[-1] != -100) for _, y in padded)}
    return rows, details


def bench_train(ctx):
    rows, details = [], {}
    for preset in ctx.train_presets:
        times = ctx.memo.get(("full_step", preset))  # `lora_step` may have timed this very step already
        if times is None:
            model = build_model(preset, ctx.device)
            batch = random_batch(model.config.vocab_size, ctx.batch_size, ctx.seq_len, ctx.device)
            times = ctx.time({"full": make_train_step(model, batch)})["full"]
            del model
        with torch.device("meta"):  # shapes only, no memory
            n_params = TinyMindForCausalLM(get_config(preset)).num_parameters()
        tps = ctx.batch_size * ctx.seq_len / med(times)
        what = f"training tokens/s, full FT step ({preset}, {n_params / 1e6:.1f}M params, batch {ctx.shape}, fp32)"
        rows.append(row(f"train_{preset}", what, tps, f"{tps:.0f} tok/s ({med(times):.3f} s/step)", "tok/s"))
        details[preset] = {"step_s": times, "params": n_params}
    return rows, details


def bench_train_compile(ctx):
    """The same full step under ``torch.compile`` (the trainers' ``--use_compile 1``) vs eager, interleaved.
    Compiling costs about a minute per model on a 2-core CPU, so --quick leaves this out."""
    if ctx.args.quick:
        return [], {"skipped": "torch.compile takes about a minute per model; not measured with --quick"}
    rows, details = [], {}
    for preset in ctx.train_presets:
        model = build_model(preset, ctx.device)
        batch = random_batch(model.config.vocab_size, ctx.batch_size, ctx.seq_len, ctx.device)
        eager, compiled = make_train_step(model, batch), make_train_step(torch.compile(model), batch)
        t0 = time.perf_counter()
        compiled()                                  # the first call compiles forward and backward
        sync(ctx.device)
        compile_s = time.perf_counter() - t0
        times = ctx.time({"eager": eager, "compiled": compiled})
        e, c = med(times["eager"]), med(times["compiled"])
        what = f"training step, torch.compile vs eager ({preset}, full FT, batch {ctx.shape}, fp32)"
        rows.append(row(f"train_compile_{preset}", what, e / c,
                        f"{e / c:.2f}x faster (compiled {c:.3f} s vs eager {e:.3f} s per step; compiling took "
                        f"{compile_s:.0f} s)", "x"))
        details[preset] = {"eager_s": times["eager"], "compiled_s": times["compiled"], "compile_s": compile_s}
        del model, eager, compiled
        torch._dynamo.reset()
    return rows, details


def linear_shapes(cfg):
    """The step's parameter products, one (name, in, out, uses per forward) per shape: every nn.Linear of
    the blocks and the LM head (a tied embedding's lookup is no product)."""
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = C // cfg.num_attention_heads * cfg.num_key_value_heads
    return [("q_proj/o_proj", C, C, 2 * L), ("k_proj/v_proj", C, kv, 2 * L), ("gate_proj/up_proj", C, I, 2 * L),
            ("down_proj", I, C, L), ("lm_head", C, cfg.vocab_size, 1)]


def linear_products(rows, k, n, dtype, device, uses=1, weight_grad=True):
    """(fn, FLOPs): ``uses`` times the three products of a linear layer's training step, as autograd runs
    them for nn.Linear: y = x W^T, dx = dy W, dW = dy^T x (x: (rows, k), W: [n, k]), 2 rows k n FLOPs each;
    ``weight_grad=False``: the first two only (a frozen weight, as in LoRA)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=g).to(device=device, dtype=dtype)
                for shape in ((rows, k), (n, k), (rows, n)))

    def fn():
        with torch.no_grad():
            for _ in range(uses):
                torch.nn.functional.linear(x, w)
                dy @ w
                if weight_grad:
                    dy.t() @ x
    return fn, uses * (6 if weight_grad else 4) * rows * k * n


def bf16_path(device):
    """Which bf16 arithmetic a device runs: the CPU's (native or emulated, model.common.cpu_bf16_path)."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported() else "no CUDA bf16: emulated"
    return cpu_bf16_path()


FLOP_DTYPES = (("fp32", torch.float32), ("bf16", torch.bfloat16))


def bench_gemm_rate(ctx):
    """GFLOP/s of the step's own products per shape and dtype, and over the step's mix of them (the FLOPs
    of every use of every shape / their time): the matrix rate a training step could reach."""
    cfg = get_config(ctx.flop_preset)
    rows_n = ctx.flop_batch * ctx.seq_len   # the batch's tokens: the rows of every product
    shapes = linear_shapes(cfg)
    fns, flops = {}, {}
    for key, dtype in FLOP_DTYPES:
        for name, k, n, _ in shapes:
            fns[(key, name)], flops[(key, name)] = linear_products(rows_n, k, n, dtype, ctx.device)
    times = ctx.time({f"{key} {name}": fn for (key, name), fn in fns.items()})
    rows, details = [], {"preset": ctx.flop_preset, "tokens": rows_n, "bf16_path": bf16_path(ctx.device),
                         "shapes": {name: {"in": k, "out": n, "uses": uses} for name, k, n, uses in shapes}}
    for key, _ in FLOP_DTYPES:
        rate = {name: flops[(key, name)] / med(times[f"{key} {name}"]) / 1e9 for name, _, _, _ in shapes}
        total = sum(uses * flops[(key, name)] for name, _, _, uses in shapes)
        mix = total / sum(uses * med(times[f"{key} {name}"]) for name, _, _, uses in shapes) / 1e9
        details[key] = {"mix_gflop_s": mix, "gflop_s": rate,
                        "seconds": {name: times[f"{key} {name}"] for name, _, _, _ in shapes}}
        per_shape = ", ".join(f"{rows_n}x{k}x{n} {rate[name]:.0f}" for name, k, n, _ in shapes)
        path = "" if key == "fp32" else f"; {details['bf16_path']}; {mix / details['fp32']['mix_gflop_s']:.2f}x fp32"
        what = f"GEMM GFLOP/s at the training step's shapes ({ctx.flop_preset}, {rows_n} tokens, {key})"
        rows.append(row(f"gemm_rate_{key}", what, mix, f"{mix:.0f} GFLOP/s over the step's mix (per shape "
                                                       f"M x K x N: {per_shape}){path}", "GFLOP/s"))
    return rows, details


def step_flops_per_token(cfg, seq_len):
    """Training FLOPs per token: 6 N for the parameter products (N = the blocks' linear weights + the LM head;
    forward 2 N, backward 4 N) plus 12 L T C for attention (q k^T and the weighted sum of v, 2 T C each per
    layer forward, times 3 with the backward; counted over all T keys as is usual, though causal attention
    needs about half). Norms, RoPE, softmax and the optimizer are left out: they are not matrix products."""
    n_params = sum(k * n * uses for _, k, n, uses in linear_shapes(cfg))   # each use is a weight of its own
    return 6 * n_params + 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def bench_train_flop_share(ctx):
    """The training step's FLOP rate (``step_flops_per_token``) as a share of the GEMM rate at its own shapes,
    fp32 and bf16 autocast. Each step and the step's parameter products alone (``linear_products``, every
    use of every shape) are timed interleaved, so both sides of the share see the same moments of a busy
    machine."""
    cfg = get_config(ctx.flop_preset)
    tokens = ctx.flop_batch * ctx.seq_len
    model = build_model(ctx.flop_preset, ctx.device)
    batch = random_batch(cfg.vocab_size, ctx.flop_batch, ctx.seq_len, ctx.device)
    fns, product_flops = {}, {}
    for key, dtype in FLOP_DTYPES:
        fns[f"{key} step"] = make_train_step(copy.deepcopy(model), batch, dtype)
        parts = [linear_products(tokens, k, n, dtype, ctx.device, uses) for _, k, n, uses in linear_shapes(cfg)]
        fns[f"{key} products"] = lambda parts=parts: [fn() for fn, _ in parts]
        product_flops[key] = sum(flops for _, flops in parts)
    del model
    times = ctx.time(fns)
    step_flops = tokens * step_flops_per_token(cfg, ctx.seq_len)
    rows, details = [], {"preset": ctx.flop_preset, "batch": [ctx.flop_batch, ctx.seq_len],
                         "flops_per_token": step_flops // tokens, "bf16_path": bf16_path(ctx.device),
                         "rule": "6 N + 12 L T C per token (N: linear weights of the blocks + LM head); the "
                                 "GEMM rate: the step's parameter products alone, timed interleaved"}
    for key, _ in FLOP_DTYPES:
        step_s, products_s = med(times[f"{key} step"]), med(times[f"{key} products"])
        step_rate, gemm_rate = step_flops / step_s / 1e9, product_flops[key] / products_s / 1e9
        share = 100 * step_rate / gemm_rate
        extra = ""
        if key == "bf16":
            extra = f"; {details['bf16_path']}; {details['fp32']['step_s_median'] / step_s:.2f}x fp32's step"
        what = f"training step FLOP rate vs GEMM rate ({ctx.flop_preset}, batch {ctx.flop_batch}x{ctx.seq_len}, {key})"
        rows.append(row(f"train_flop_share_{key}", what, share,
                        f"{step_rate:.1f} GFLOP/s = {share:.0f}% of {gemm_rate:.1f} GFLOP/s ({tokens / step_s:.0f} "
                        f"tok/s, {step_s:.3f} s/step; products alone {products_s:.3f} s){extra}", "% of limit"))
        details[key] = {"step_s": times[f"{key} step"], "products_s": times[f"{key} products"],
                        "step_s_median": step_s, "step_gflop_s": step_rate, "gemm_gflop_s": gemm_rate,
                        "share_pct": share}
    return rows, details


def stored_bytes(model):
    """Bytes of the weights (the state dict: parameters and saved buffers, not the RoPE cache), a tensor
    shared by two modules (tied weights) counted once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def bench_qlora_memory(ctx):
    from model.lora_variants.qlora import quantize_base

    preset = ctx.preset if ctx.args.quick else "small"
    model = build_model(preset, "cpu")
    fp32 = stored_bytes(model)
    quantize_base(model, block_size=64, double_quant=True)
    nf4 = stored_bytes(model)
    what = f"QLoRA base memory, NF4 (blocks of 64, double quant) vs fp32 ({preset})"
    rows = [row("qlora_memory", what, nf4 / fp32, f"{nf4 / fp32:.3f}x ({nf4 / 2**20:.1f} MiB vs {fp32 / 2**20:.1f} MiB)", "x")]
    return rows, {"preset": preset, "fp32_bytes": fp32, "nf4_bytes": nf4}


# ----------------------------------------------------------------------------------------------------
# the LoRA step of a released model's shape

# SmolLM2-135M's config.json, as TinyMind fields (shape-true: the weights are random, nothing is downloaded)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, tie_word_embeddings=True)
QUICK_REAL = dict(SMOLLM2_135M, vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
# name -> (base and compute dtype, gradient checkpointing, LM head chunk rows): what train_lora.py's
# --base_dtype / --dtype, --grad_checkpoint and --head_chunk set
REAL_VARIANTS = {
    "today": ("fp32", False, 0),   # the step before these options: fp32 base, whole head
    "fp32": ("fp32", False, 256),
    "fp32_ckpt": ("fp32", True, 256),
    "bf16": ("bf16", False, 256),
    "bf16_ckpt": ("bf16", True, 256),
}
REAL_RANK = 16   # train_lora.py's default rank, on its default targets (the 7 projections)


def real_shape(quick):
    return QUICK_REAL if quick else SMOLLM2_135M


def real_model(shape, variant, device):
    """The shape-true model with a fresh rank-16 adapter, set up as train_lora.py sets up ``variant``."""
    from model.lora_frozen_base import hold_frozen_base
    from model.model import TinyMindConfig

    dtype, ckpt, rows = REAL_VARIANTS[variant]
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(**shape)).to(device)
    add_lora(model, REAL_RANK, DEFAULT_TARGETS)
    hold_frozen_base(model, dict(FLOP_DTYPES)[dtype])
    model.model.gradient_checkpointing = ckpt
    model.head_chunk_rows = rows
    return model


def lora_step_flops_per_token(model, seq_len):
    """4 N (forward 2 N, input gradients 2 N: the frozen weights get none) + 6 per adapter weight (forward
    2, its input and weight gradients 4) + 12 L T C for attention (as ``step_flops_per_token``)."""
    cfg = model.config
    n_params = sum(k * n * uses for _, k, n, uses in linear_shapes(cfg))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * n_params + 6 * adapters + 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def real_worker(args):
    """Hidden ``--_worker real_<variant>``: peak memory of one ``lora_135m`` variant in a fresh process."""
    variant = args._worker[len("real_"):]
    device = torch.device(args.device)
    warm = build_model("smoke", device)
    make_train_step(warm, random_batch(warm.config.vocab_size, 1, 8, device))()
    del warm
    gc.collect()
    before_model = current_memory_mb(device)
    reset_peak_memory(device)
    model = real_model(real_shape(args.quick), variant, device)
    after_model = current_memory_mb(device)
    batch = random_batch(model.config.vocab_size, args.batch_size, args.seq_len, device)
    step = make_train_step(model, batch, dict(FLOP_DTYPES)[REAL_VARIANTS[variant][0]])
    for _ in range(2):   # AdamW's moments exist from step 1 on
        step()
    print(json.dumps({"variant": variant, "before_model_mb": before_model, "after_model_mb": after_model,
                      "peak_mb": peak_memory_mb(device)}))


def real_memory(ctx, variants, batch_size, seq_len):
    """Peak memory of each variant, one fresh process at a time (they would share the cores)."""
    flags = ("--batch_size", str(batch_size), "--seq_len", str(seq_len), *(["--quick"] if ctx.args.quick else []))
    return {v: worker_result(f"real_{v}", start_worker(ctx, f"real_{v}", *flags)) for v in variants}


def bench_lora_135m(ctx):
    """Each variant's step and its dtype's products (forward + input gradient of every weight use, as the
    step runs them) timed interleaved; then each variant's peak memory in a process of its own."""
    a, q = ctx.args, ctx.args.quick
    shape = real_shape(q)
    bs, T = (2, 32) if q else (a.batch_size or 8, a.seq_len or 128)
    native = ctx.device.type == "cuda" or cpu_info()["native_bf16"]
    variants = [v for v in REAL_VARIANTS if REAL_VARIANTS[v][0] == "fp32" or native or a.real_bf16]
    if q:   # toy sizes: one variant per dtype, checkpointing and the chunked head on in one of them
        variants = ["today", "bf16_ckpt"]
    dtypes = sorted({REAL_VARIANTS[v][0] for v in variants}, key=lambda k: k != "fp32")
    fns, models = {}, {}
    for v in variants:
        models[v] = real_model(shape, v, ctx.device)
        batch = random_batch(shape["vocab_size"], bs, T, ctx.device)
        fns[v] = make_train_step(models[v], batch, dict(FLOP_DTYPES)[REAL_VARIANTS[v][0]])
    cfg = models[variants[0]].config
    product_flops = {}
    for key in dtypes:
        parts = [linear_products(bs * T, k, n, dict(FLOP_DTYPES)[key], ctx.device, uses, weight_grad=False)
                 for _, k, n, uses in linear_shapes(cfg)]
        fns[f"{key} products"] = lambda parts=parts: [fn() for fn, _ in parts]
        product_flops[key] = sum(flops for _, flops in parts)
    flops = bs * T * lora_step_flops_per_token(models[variants[0]], T)
    del models
    gc.collect()
    times = ctx.time(fns, repeats=None if q else max(2, ctx.repeats // 2))
    memory = real_memory(ctx, variants, bs, T)
    rows, details = [], {"shape": shape, "batch": [bs, T], "rank": REAL_RANK, "flops_per_step": flops,
                         "bf16_path": bf16_path(ctx.device), "variants": {}, "gemm_gflop_s": {},
                         "rule": "4 N + 6 per adapter weight + 12 L T C per token; GEMM rate: every weight "
                                 "use's forward and input-gradient products, timed interleaved with the steps"}
    for key in dtypes:
        details["gemm_gflop_s"][key] = product_flops[key] / med(times[f"{key} products"]) / 1e9
    name = "SmolLM2-135M shape" if not q else "toy shape"
    for v in variants:
        dtype, ckpt, head_rows = REAL_VARIANTS[v]
        step_s = med(times[v])
        tok_s = bs * T / step_s
        share = 100 * flops / step_s / 1e9 / details["gemm_gflop_s"][dtype]
        m = memory[v]
        peak, weights = m["peak_mb"] - m["before_model_mb"], m["after_model_mb"] - m["before_model_mb"]
        details["variants"][v] = {"step_s": times[v], "tokens_per_s": tok_s, "flop_share_pct": share,
                                  "peak_mb_above_runtime": peak, "model_mb": weights, "memory": m}
        how = (f"{dtype} base{' + bf16 autocast' if dtype == 'bf16' else ''}, "
               f"{'checkpointing' if ckpt else 'no checkpointing'}, "
               f"{f'head in chunks of {head_rows}' if head_rows else 'whole head'}")
        what = f"LoRA step, {name} ({how}), r={REAL_RANK}, batch {bs}x{T}"
        rows.append(row(f"lora_135m_{v}", what, tok_s,
                        f"{tok_s:.0f} tok/s ({step_s:.2f} s/step), {share:.0f}% of the {dtype} GEMM rate "
                        f"({details['gemm_gflop_s'][dtype]:.0f} GFLOP/s), peak memory {peak:.0f} MB above the "
                        f"runtime (model {weights:.0f} MB)", "tok/s"))
    for key in dtypes:   # the judged row: the fastest variant of the dtype (without checkpointing where measured)
        own = [v for v in variants if REAL_VARIANTS[v][0] == key]
        best = max([v for v in own if not REAL_VARIANTS[v][1]] or own,
                   key=lambda v: details["variants"][v]["flop_share_pct"])
        share = details["variants"][best]["flop_share_pct"]
        emulated = key == "bf16" and not native
        what = f"LoRA step FLOP rate as % of the {key} GEMM rate ({name}, {best})"
        rows.append(row(f"lora_135m_share_{key}{'_emulated' if emulated else ''}", what, share,
                        f"{share:.0f}% ({flops / 1e9:.1f} GFLOP per step, {ctx.device} {key}"
                        f"{': emulated here' if emulated else ''})", "%"))
    return rows, details


BENCHES = {
    "lora_step": bench_lora_step,
    "lora_memory": bench_lora_memory,
    "merged_forward": lambda ctx: bench_forward(ctx, "merged"),
    "unmerged_forward": lambda ctx: bench_forward(ctx, "unmerged"),
    "kv_cache": bench_kv_cache,
    "decode": bench_decode,
    "packing": bench_packing,
    "train": bench_train,
    "train_compile": bench_train_compile,
    "qlora_memory": bench_qlora_memory,
    "gemm_rate": bench_gemm_rate,
    "train_flop_share": bench_train_flop_share,
    "lora_135m": bench_lora_135m,
}


# ----------------------------------------------------------------------------------------------------
# judging, reporting

def judge(name, value, quick):
    """(target text, status) for a row; rows without a target (extra rows, absolute figures) get '-'."""
    if name not in TARGETS:
        return "reported", "-"
    op, thr = TARGETS[name]
    unit = "% of limit" if name.startswith("decode") else "% of the GEMM rate" if "share" in name else "x"
    text = f"1.00x ± {thr:.2f}" if op == "within" else f"{op} {thr:g}{unit}"
    ok = abs(value - 1.0) <= thr if op == "within" else (value >= thr if op == ">=" else value <= thr)
    return text, ("not judged (quick)" if quick else ("PASS" if ok else "MISS"))


def markdown_table(rows):
    """The result table; decode rows also fill the "% of limit" column (their judged value)."""
    lines = ["| measurement | result | % of limit | target | status |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        pct = f"{r['value']:.0f}%" if r["unit"] == "% of limit" else ""
        lines.append(f"| {r['what']} | {r['result']} | {pct} | {r['target']} | {r['status']} |")
    return "\n".join(lines)


def render_report(report: dict) -> str:
    """The markdown a doc quotes for a saved bench JSON: the table, then the machine, command and date
    it was measured with. Nothing is re-measured (``--render``)."""
    if report.get("format") != "tinymind-bench" or not isinstance(report.get("rows"), list):
        raise TinyMindError("not a TinyMind bench JSON (format 'tinymind-bench' with 'rows')")
    m = report.get("machine", {})
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    bf16 = f" ({m['cpu_bf16']})" if m.get("cpu_bf16") else ""   # absent from results saved before it was kept
    machine = (f"{m.get('cpu', '?')}{bf16} x{m.get('cpu_count', '?')}{gpu}, {m.get('torch_threads', '?')} torch "
               f"threads, torch {m.get('torch', '?')}, Python {m.get('python', '?')}, {m.get('platform', '?')}")
    return (f"{markdown_table(report['rows'])}\n\nMachine: {machine}. Command: `{report.get('command', '?')}`. "
            f"Date: {report.get('date', '?')}.")


def render_file(path) -> str:
    path = repo_path(path)
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TinyMindError(f"--render {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinyMindError(f"--render {path}: not JSON ({e})") from None
    try:
        return render_report(report)
    except (TinyMindError, KeyError, TypeError) as e:
        raise TinyMindError(f"--render {path}: {e}") from None


def machine_info(device):
    return {"platform": platform.platform(), "cpu": cpu_info()["cpu"], "cpu_bf16": cpu_bf16_path(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def pick_device(arg):
    """The one device rule (model.common.setup_device); the benchmark itself casts where it compares dtypes."""
    return setup_device(arg, "float32", log=False, inference=True).device


def parse_args(argv):
    p = argparse.ArgumentParser(description="TinyMind bench: LoRA, KV-cache, packing and throughput ratios, "
                                            "as a markdown table and JSON.")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes (smoke preset, batch 2x64, 24 tokens) and 1 repetition: every measurement "
                        "runs in ~30 s, targets are not judged (CI)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (medians are "
                                                             "reported); default 5, 1 with --quick")
    p.add_argument("--only", default=None,
                   help=f"comma list of measurements to run (default: all): {', '.join(MEASUREMENTS)}")
    p.add_argument("--out", default="out/bench.json",
                   help="JSON result file, default out/bench.json (relative paths from the repo root)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print the markdown table, machine, command and date of a saved result JSON "
                        "(e.g. docs/results/bench.json) and exit; measures nothing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice; 1 with --quick)")
    p.add_argument("--preset", default=None, help="model preset for the LoRA, forward and decode measurements "
                                                  "(default small, smoke with --quick)")
    p.add_argument("--batch_size", type=int, default=None, help="batch size of the training/forward batches "
                                                                "(default 4 on CPU, 16 on CUDA, 2 with --quick)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default 256, 64 with --quick)")
    p.add_argument("--new_tokens", type=int, default=None, help="tokens to decode (default 256, 24 with --quick)")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt length for the decode measurements (default 16)")
    p.add_argument("--lora_rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora_targets", default="all-linear",
                   help="LoRA targets: name list, all-linear or re:REGEX (default all-linear)")
    p.add_argument("--corpus", default="dataset/pretrain_demo.jsonl",
                   help="pretraining corpus for `packing` (default dataset/pretrain_demo.jsonl)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for `packing` (default: the shipped model/tokenizer.json)")
    p.add_argument("--corpus_docs", type=int, default=None,
                   help="use the first N documents of --corpus (default 2000, 200 with --quick)")
    p.add_argument("--packing_preset", default=None,
                   help="model preset for `packing` (default tiny, smoke with --quick)")
    p.add_argument("--packing_steps", type=int, default=2,
                   help="training steps per variant and repetition in `packing` (default 2)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall (default): elapsed time, what you wait for; cpu: this process's CPU time, steadier "
                        "on a machine shared with other jobs (use it with --threads 1; CPU only)")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a judged target is missed")
    p.add_argument("--real_bf16", type=int, default=0, choices=[0, 1],
                   help="lora_135m: 1 = time the bf16-base variants even where bf16 is emulated (many times "
                        "slower than fp32 there) (default: 0, only where bf16 is native)")
    p.add_argument("--_worker", choices=("full", "lora", *(f"real_{v}" for v in REAL_VARIANTS)), default=None,
                   help=argparse.SUPPRESS)  # lora_memory's / lora_135m's child
    args = p.parse_args(argv)
    for flag in ("repeats", "batch_size", "seq_len", "new_tokens", "prompt_len", "lora_rank", "threads",
                 "corpus_docs", "packing_steps"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise TinyMindError(f"--{flag} must be >= 1 (got {v})")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        text = render_file(args.render)
        print(text)
        return text
    threads = torch.get_num_threads()
    if args.threads or args.quick:
        # Toy sizes gain nothing from threads, and one thread is far steadier on a machine shared with other jobs.
        torch.set_num_threads(args.threads or 1)
    try:
        if args._worker:
            return real_worker(args) if args._worker.startswith("real_") else memory_worker(args)
        return run_bench(args, argv)
    finally:
        torch.set_num_threads(threads)  # main() called from Python (tests) leaves the caller's setting alone


def run_bench(args, argv):
    names = (MEASUREMENTS if args.quick else DEFAULT_RUN) if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown or not names:
        raise TinyMindError(f"--only {args.only!r}: unknown measurement {unknown}; "
                            f"choose from {', '.join(MEASUREMENTS)}")
    device = pick_device(args.device)
    if args.timer == "cpu" and device.type != "cpu":
        raise TinyMindError("--timer cpu measures CPU time and cannot see GPU work: "
                            "use --timer wall with --device cuda")
    for preset in filter(None, (args.preset, args.packing_preset)):
        get_config(preset)  # an unknown preset fails now, with the list of choices, not minutes later
    ctx = Ctx(args, device)
    report = {"format": "tinymind-bench", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python dev/bench.py " + shlex.join(argv), "machine": machine_info(device),
              "settings": {"quick": args.quick, "preset": ctx.preset, "train_presets": list(ctx.train_presets),
                           "packing_preset": ctx.packing_preset, "batch_size": ctx.batch_size,
                           "seq_len": ctx.seq_len, "new_tokens": ctx.new_tokens, "repeats": ctx.repeats,
                           "lora_rank": args.lora_rank, "lora_targets": args.lora_targets, "timer": args.timer},
              "measurements": {}, "rows": []}
    print(f"[bench] {report['machine']['cpu']} x{os.cpu_count()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}", flush=True)
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        rows, details = BENCHES[name](ctx)
        for r in rows:
            r["target"], r["status"] = judge(r["name"], r["value"], args.quick)
            print(f"[bench] {r['what']}: {r['result']} [{r['status']}]", flush=True)
        report["measurements"][name] = {"rows": rows, "details": details, "seconds": time.perf_counter() - t0}
        report["rows"] += rows
        gc.collect()
    report["seconds"] = time.perf_counter() - t_all
    report["table"] = markdown_table(report["rows"])
    print()
    print(render_report(report))
    out = atomic_write_text(repo_path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"\n[bench] {report['seconds']:.0f} s; wrote {out}")
    if args.check and any(r["status"] == "MISS" for r in report["rows"]):
        sys.exit(1)
    return report


if __name__ == "__main__":
    run_main(main)
