"""Convert TinyMind checkpoints and LoRAs to and from transformers, PEFT and MiniMind files.

One command per direction (--to for exports, --from for imports):

    # TinyMind -> transformers folder (LlamaForCausalLM; Qwen3ForCausalLM for a model with q/k norms; an
    # imported model goes back to its own family: Llama, Qwen2, Qwen3 or Mistral)
    python scripts/convert_model.py --weight full_sft --to hf --out out/hf/full_sft
    # TinyMind LoRA -> PEFT adapter folder (load it with PeftModel.from_pretrained(hf_model, folder))
    python scripts/convert_model.py --weight full_sft --lora_weight lora_identity --to peft --out out/hf/lora_identity
    # transformers folder (Llama incl. 3.x, SmolLM2, Qwen2/2.5, Qwen3, Mistral) -> out/from_hf_{hidden}.pth,
    # with its tokenizer and chat template kept as out/from_hf_tokenizer*.json (--info: its shape and size only)
    python scripts/convert_model.py --from hf --in out/hf/full_sft --weight from_hf
    # PEFT adapter for that model -> out/lora_from_peft_{hidden}.pth
    python scripts/convert_model.py --from peft --in out/hf/lora_identity --weight from_hf --lora_name lora_from_peft
    # MiniMind state dict -> out/mm_sft_512.pth (--preset small / base / minimind3, or the architecture flags)
    python scripts/convert_model.py --from minimind --in full_sft_512.pth --preset small --weight mm_sft
    # MiniMind LoRA file -> out/mm_medical_512.pth, for the base imported just above
    python scripts/convert_model.py --from minimind --in lora_medical_512.pth --weight mm_sft --lora_name mm_medical

Exports write safetensors and JSON; imports read safetensors, or .pth/.bin with torch.load(weights_only=True).
Every file is written atomically. Converting needs no GPU and no transformers/peft (the same commands run on
any machine; torchrun is not needed). Paths are taken from the repository root.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import shutil

import torch

from model.chat_template import companion_files
from model.common import TinyMindError, atomic_write, find_checkpoint, read_json, repo_path, run_main, safe_load
from model.engine import load_adapters, load_base
from model.hf_format import (ARCHS, DTYPES, compact_targets, config_from_hf, export_hf, export_peft, hf_arch,
                             peft_variant, read_hf, read_peft)
from model.minimind_format import describe, minimind_lora, minimind_state, read_minimind
from model.model import (PRESETS, TinyMindConfig, TinyMindForCausalLM, count_parameters, get_config, load_model,
                         save_model)
from model.lora_file import LORA_FORMAT
from model.model_lora import LoRAConfig, apply_lora, base_state_dict, load_lora, merge_lora, save_lora
from model.tokenizer import DEFAULT_TOKENIZER_PATH, load_model_tokenizer, load_tokenizer
from tools.cli import add_model_flags, lora_names

ARCH_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf", "peft"], help="export: hf = transformers folder, peft = PEFT adapter")
    way.add_argument("--from", dest="src", choices=["hf", "peft", "minimind"],
                     help="import: a transformers folder, a PEFT adapter folder, or a MiniMind .pth file")
    # --dtype and --tokenizer_path mean other things here (what an export writes, what an import came
    # with), and --hidden_size is one of the architecture flags below: only these three are the shared ones.
    add_model_flags(p, "weight", "lora_weight", "save_dir",
                    helps={"weight": "TinyMind checkpoint name {save_dir}/{weight}_{hidden}.pth: read by --to and "
                                     "by LoRA imports (the base), written by model imports",
                           "lora_weight": "--to peft: the LoRA to export; --to hf: LoRA(s), comma-separated, "
                                          "merged into the export",
                           "save_dir": "folder of TinyMind checkpoints and LoRA files"})
    p.add_argument("--lora_name", default=None, help="LoRA imports: writes {save_dir}/{lora_name}_{hidden}.pth")
    p.add_argument("--in", dest="in_path", default=None, help="imports: the folder (hf, peft) or .pth file (minimind)")
    p.add_argument("--out", default=None, help="exports: the folder to write (default {save_dir}/hf/{name})")
    p.add_argument("--arch", default="auto", choices=["auto", *ARCHS],
                   help="--to hf: the transformers family (auto: the one the model was imported from, else "
                        "qwen3 for q/k norms, qwen2 for q/k/v biases, llama otherwise)")
    p.add_argument("--info", action="store_true",
                   help="--from hf: read only config.json and print what TinyMind makes of it (family, shape, "
                        "parameter count, fp32 size); writes nothing")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="--to hf/peft: dtype of the exported tensors (float32 keeps them bit-exact)")
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer file: --to hf exports it (default {save_dir}/{weight}_tokenizer.json if an "
                        f"import kept one, else {DEFAULT_TOKENIZER_PATH}); imports: the one the weights were "
                        "trained with (MiniMind's model/tokenizer.json), kept as {save_dir}/{weight}_tokenizer.json")
    p.add_argument("--base_model", default=None,
                   help="--to peft: base_model_name_or_path written into adapter_config.json "
                        "(default: {save_dir}/hf/{weight}, where --to hf puts it)")
    p.add_argument("--stage", default=None, choices=["pretrain", "sft"],
                   help="model imports: stage stored in the checkpoint (eval_llm chats with sft, continues pretrain); "
                        "default: pretrain if the input name starts with 'pretrain', else sft")
    p.add_argument("--overwrite", action="store_true",
                   help="imports: replace an existing {save_dir}/{weight or lora_name}_{hidden}.pth")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="--from minimind: architecture of the file (small = MiniMind2-Small, base = MiniMind2, "
                        "minimind3); the flags below override single fields")
    for name in ARCH_FLAGS:
        kind = float if name in ("rope_theta", "rms_norm_eps") else int
        extra = " (also picks {weight}_{hidden}.pth)" if name == "hidden_size" else ""
        p.add_argument(f"--{name}", type=kind, default=None, help=f"--from minimind: {name} of the file{extra}")
    p.add_argument("--qk_norm", type=int, choices=[0, 1], default=None,
                   help="--from minimind: 1 if the file has q/k norms (minimind-3)")
    return p


# ----------------------------------------------------------------------------- helpers

def out_folder(args, name: str) -> Path:
    """The export folder; an existing non-empty folder must be an earlier export (never a random folder)."""
    out = repo_path(args.out or Path(args.save_dir) / "hf" / name)
    if out.is_file():
        raise TinyMindError(f"--out {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / f).is_file() for f in
                                                       ("config.json", "adapter_config.json")):
        raise TinyMindError(f"--out {out} is a non-empty folder that holds no export; pick another folder")
    return out


def new_file(args, name: str, hidden: int, what: str) -> Path:
    """{save_dir}/{name}_{hidden}.pth for an import; an existing file is kept unless --overwrite."""
    path = repo_path(args.save_dir) / f"{name}_{hidden}.pth"
    if path.exists() and not args.overwrite:
        raise TinyMindError(f"{path} exists; choose another {what} or pass --overwrite to replace it")
    return path


def keep_tokenizer(tok_path: Path | None, cfg: TinyMindConfig, save_dir: Path, weight: str) -> str:
    """Check the tokenizer that comes with imported weights; one that differs from TinyMind's own (its
    vocabulary or its chat template) is copied to {save_dir}/{weight}_tokenizer.json, with the files
    beside it that hold its chat template and end-of-turn ids ({weight}_tokenizer_config.json, ...).
    Returns the --tokenizer_path flag eval_llm.py needs (or "")."""
    if tok_path is None:
        return ""
    tok = load_model_tokenizer(tok_path, cfg.vocab_size, "the model")
    if tok.chat is None and tok.fingerprint == load_tokenizer().fingerprint:
        return ""
    dest = save_dir / f"{weight}_tokenizer.json"
    sources = {dest: tok_path}
    if tok.chat is not None:
        sources.update({companion_files(dest)[name]: path for name, path in companion_files(tok_path).items()})
    for target, source in sources.items():
        if source.is_file():
            with atomic_write(target) as tmp:
                shutil.copyfile(source, tmp)
        elif target.is_file():   # left by an earlier import under this name: not this model's
            target.unlink()
    chat = "its own chat template" if tok.chat is not None else "ChatML"
    print(f"[convert] its tokenizer differs from {DEFAULT_TOKENIZER_PATH}: kept as {dest} ({chat})")
    return f" --tokenizer_path {dest}"


def import_lora(args, fields: dict, adapter: dict[str, torch.Tensor], source: str) -> Path:
    """Write adapter tensors {module.lora_A / .lora_B} as a TinyMind LoRA file for the base --weight."""
    if not args.lora_name:
        raise TinyMindError("a LoRA import needs --lora_name (the new file is {save_dir}/{lora_name}_{hidden}.pth)")
    base_path = find_checkpoint(args.save_dir, args.weight, args.hidden_size, "base checkpoint")
    model, _ = load_model(base_path)
    new_file(args, args.lora_name, model.config.hidden_size, "--lora_name")   # refuse before any work
    linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    names = set(k.rpartition(".")[0] for k in adapter)
    missing = sorted(names - set(linear))
    if missing:
        raise TinyMindError(f"{source}: layer {missing[0]!r} does not exist in {base_path.name}")
    names = [n for n in linear if n in names]   # the model's order (safetensors files sort their keys)
    cfg = LoRAConfig(**fields, targets=",".join(compact_targets(model, names)))
    apply_lora(model, cfg, adapter_name=args.lora_name)   # wraps exactly `names`: compact_targets selects them
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            for ab in ("A", "B"):
                t, p = adapter[f"{n}.lora_{ab}"], getattr(layer, f"lora_{ab}")[args.lora_name]
                if t.shape != p.shape:
                    raise TinyMindError(f"{source}: {n}.lora_{ab} has shape {tuple(t.shape)}, "
                                        f"{base_path.name} needs {tuple(p.shape)}")
                p.copy_(t)
    out = new_file(args, args.lora_name, model.config.hidden_size, "--lora_name")
    save_lora(model, out, adapter_name=args.lora_name, source=source, base_weight=args.weight)
    print(f"[convert] wrote {out} (rank {cfg.rank}, alpha {cfg.alpha:g}, targets {cfg.targets}, "
          f"{len(names)} layers); chat: python eval_llm.py --weight {args.weight} --lora_weight {args.lora_name}")
    return out


def write_model(args, cfg: TinyMindConfig, state: dict, source: str, tok_path: Path | None, **extra) -> Path:
    model = TinyMindForCausalLM(cfg)
    model.load_state_dict(state, strict=True)
    stage = args.stage or ("pretrain" if Path(source).name.startswith("pretrain") else "sft")
    out = new_file(args, args.weight, cfg.hidden_size, "--weight")
    flag = keep_tokenizer(tok_path, cfg, repo_path(args.save_dir), args.weight)
    save_model(model, out, stage=stage, weight=args.weight, source=str(source), **extra)
    options = [f"{k} {v}" for k, v in cfg.to_dict().items() if k in ("qk_norm", "head_dim", "qkv_bias", "rope_scaling")]
    print(f"[convert] wrote {out} (stage {stage}, {model.num_parameters() / 1e6:.2f}M params"
          f"{''.join(', ' + o for o in options)}); chat: python eval_llm.py --weight {args.weight}{flag}")
    return out


def minimind_config(args, state: dict, where) -> TinyMindConfig:
    flags = {k: getattr(args, k) for k in ARCH_FLAGS}
    if args.qk_norm is not None:
        flags["qk_norm"] = bool(args.qk_norm)
    if args.preset is None and flags["hidden_size"] is None:
        raise TinyMindError(f"{where} carries no config: give --preset (small, base, minimind3) or the "
                            f"architecture flags; the file looks like: {describe(state)}")
    if args.preset is None:   # flags only: MiniMind's own defaults for the rest are the `small` preset's
        return get_config("small", **flags)
    return get_config(args.preset, **flags)


# ----------------------------------------------------------------------------- the directions

def to_hf(args) -> list[Path]:
    model, ckpt, _ = load_base(args.save_dir, args.weight, args.hidden_size)
    names = lora_names(args.lora_weight)
    load_adapters(model, args.save_dir, names)   # merged in fp32 before any cast, as scripts/merge_lora.py does
    merge_lora(model)
    arch = args.arch if args.arch != "auto" else hf_arch(model.config, ckpt.get("hf_model_type"))
    out = out_folder(args, "_".join([args.weight] + names))
    kept = repo_path(args.save_dir) / f"{args.weight}_tokenizer.json"   # what an import kept beside the weights
    tok = repo_path(args.tokenizer_path) if args.tokenizer_path else kept if kept.is_file() else \
        repo_path(DEFAULT_TOKENIZER_PATH)
    files = export_hf(base_state_dict(model), model.config, out, tok, arch, args.dtype)
    print(f"[convert] wrote {out} ({', '.join(f.name for f in files)}): {arch}, {args.dtype}"
          + (f", merged {', '.join(names)}" if names else ""))
    return files


def to_peft(args) -> list[Path]:
    if not args.lora_weight or "," in args.lora_weight:
        raise TinyMindError("--to peft needs one --lora_weight (the LoRA file to export)")
    path = find_checkpoint(args.save_dir, args.weight, args.hidden_size, "checkpoint")
    lora_path = find_checkpoint(args.save_dir, args.lora_weight, args.hidden_size, "LoRA file")
    obj = safe_load(lora_path, "LoRA file")
    if obj.get("format") != LORA_FORMAT or not isinstance(obj.get("lora_config"), dict):
        raise TinyMindError(f"{lora_path} is not a TinyMind LoRA file (format {obj.get('format')!r})")
    peft_variant(obj, lora_path)   # an unknown variant is refused before anything is loaded or written
    model, _ = load_model(path)
    load_lora(model, lora_path, adapter_name="export")   # checks that the LoRA belongs to this base
    if args.dtype != "float32":
        obj = {**obj, "adapter": {k: v.to(DTYPES[args.dtype]) for k, v in obj["adapter"].items()}}
    base = args.base_model or str(repo_path(Path(args.save_dir) / "hf" / args.weight))
    out = out_folder(args, args.lora_weight)
    files = export_peft(obj, model, out, base)
    print(f"[convert] wrote {out} ({', '.join(f.name for f in files)}); base_model_name_or_path {base}")
    return files


def hf_info(folder: Path) -> TinyMindConfig:
    """--info: what TinyMind makes of a transformers config.json, without reading (or having) the weights."""
    d = read_json(folder / "config.json", "config.json")
    cfg = config_from_hf(d, folder / "config.json")
    n = count_parameters(cfg)
    extras = [name for name, on in (("q/k norms", cfg.qk_norm), ("q/k/v biases", cfg.qkv_bias),
                                    ("llama3 rope scaling", cfg.rope_scaling), ("tied embeddings",
                                                                                cfg.tie_word_embeddings)) if on]
    print(f"[convert] {folder}: {ARCHS[d['model_type']]}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
          f"layers, {cfg.num_attention_heads} heads x {cfg.head_dim} ({cfg.num_key_value_heads} kv), MLP "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}{', ' if extras else ''}{', '.join(extras)}")
    print(f"[convert] {n:,} parameters ({n / 1e6:.2f}M), {n * 4 / 2**30:.2f} GiB in fp32")
    return cfg


def from_hf(args) -> Path | TinyMindConfig:
    folder = repo_path(args.in_path)
    if args.info:
        return hf_info(folder)
    d = read_json(folder / "config.json", "config.json") if (folder / "config.json").is_file() else {}
    if d:   # an existing output is refused before the weights are read
        new_file(args, args.weight, config_from_hf(d, folder).hidden_size, "--weight")
    cfg, state = read_hf(folder)
    tok = repo_path(args.tokenizer_path) if args.tokenizer_path else folder / "tokenizer.json"
    return write_model(args, cfg, state, str(folder), tok if tok.is_file() else None, hf_model_type=d["model_type"])


def from_peft(args) -> Path:
    folder = repo_path(args.in_path)
    fields, adapter = read_peft(folder)
    return import_lora(args, fields, adapter, str(folder))


def from_minimind(args) -> Path:
    path = repo_path(args.in_path)
    kind, state = read_minimind(path)
    if kind == "lora":
        pairs = minimind_lora(state, path)
        rank = next(iter(pairs.values()))[0].shape[0]
        adapter = {f"{m}.lora_{ab}": t for m, (A, B) in pairs.items() for ab, t in (("A", A), ("B", B))}
        # MiniMind adds B(A x) unscaled: alpha = r gives TinyMind's scaling alpha / r = 1
        return import_lora(args, dict(rank=rank, alpha=float(rank)), adapter, str(path))
    cfg = minimind_config(args, state, path)
    new_file(args, args.weight, cfg.hidden_size, "--weight")
    state = minimind_state(state, cfg, path)
    tok = repo_path(args.tokenizer_path) if args.tokenizer_path else None
    if tok is None:
        print("[convert] note: MiniMind weights need MiniMind's tokenizer; name its model/tokenizer.json "
              "with --tokenizer_path")
    return write_model(args, cfg, state, str(path), tok)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.src and not args.in_path:
        raise TinyMindError(f"--from {args.src} needs --in (the folder or file to import)")
    if args.info and args.src != "hf":
        raise TinyMindError("--info goes with --from hf --in FOLDER (it reads that folder's config.json)")
    if args.to:
        return {"hf": to_hf, "peft": to_peft}[args.to](args)
    return {"hf": from_hf, "peft": from_peft, "minimind": from_minimind}[args.src](args)


if __name__ == "__main__":
    run_main(main)
