"""TinyMind models and LoRAs in the formats of transformers and PEFT (safetensors + JSON), both ways.

No transformers or peft import here: the files are plain JSON and safetensors, written by hand.

What this file implements:
- ``read_safetensors`` / ``write_safetensors``: tensors from and to ``*.safetensors`` with one-line errors,
  written atomically.
- ``hf_config`` / ``config_from_hf`` / ``hf_arch``: TinyMind's config <-> ``config.json`` of the families
  TinyMind computes exactly: ``LlamaForCausalLM`` (SmolLM2, Llama 3.x with its rope scaling),
  ``Qwen2ForCausalLM`` (Qwen2/2.5: q/k/v biases), ``Qwen3ForCausalLM`` (q/k norms, a head size apart from
  hidden / heads; minimind-3) and ``MistralForCausalLM`` without a sliding window. Whatever TinyMind
  cannot compute (another family, an o_proj or MLP bias, sliding windows, other rope scalings) is refused
  by name, with what TinyMind lacks (``LACKS``).
- ``export_hf`` / ``read_hf``: a whole transformers folder: weights, config, generation config and the
  tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with the ChatML ``chat_template``, or an
  imported model's own tokenizer files, chat template included).
- ``export_peft`` / ``read_peft``: a LoRA as a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``). ``PEFT_VARIANTS`` maps the variant named in a TinyMind LoRA file to
  PEFT's settings; a variant without an entry is refused by name.
- ``compact_targets``: the shortest ``targets`` string (suffixes, else full names) selecting given layers.

Parameter names are the same on both sides (Llama's), so a state dict maps one to one; the only
difference is that transformers leaves ``lm_head.weight`` out of the file when it is tied to the embedding.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.chat_template import companion_files
from model.common import TinyMindError, atomic_write, atomic_write_text, read_json, safe_load
from model.model import ROPE_SCALING_KEYS, TinyMindConfig, check_state_dict, expected_shapes
from model.model_lora import find_targets, is_embedding
from model.tokenizer import BOS_TOKEN, CHAT_TEMPLATE_JINJA, EOS_TOKEN, PAD_TOKEN, load_model_tokenizer

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM"}                           # model_type -> class name
PEFT_PREFIX = "base_model.model."                                    # PEFT's names: prefix + module + leaf
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- files

def write_json(path: Path, d: dict):
    atomic_write_text(path, json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TinyMindError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:   # truncated file, bad header, not safetensors at all
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TinyMindError(f"{path} is not a readable safetensors file ({first})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path):
    # {"format": "pt"} is what transformers looks for in the header; each tensor owns its memory
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(data, str(tmp), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- config.json

# What TinyMind lacks to run a family it does not read: named in the refusal.
LACKS = {
    "gemma": "GeGLU MLP, (1 + w) RMSNorm and scaled embeddings", "gemma2": "logit soft-capping, sliding window, "
    "GeGLU and extra norms", "gemma3": "sliding window, GeGLU, q/k norms with (1 + w) and extra norms",
    "gemma3_text": "sliding window, GeGLU, q/k norms with (1 + w) and extra norms",
    "phi": "LayerNorm, GELU, partial rotary embeddings and parallel attention + MLP",
    "phi3": "fused qkv / gate_up weights and longrope scaling",
    "mixtral": "a mixture-of-experts MLP", "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP", "deepseek_v3": "multi-head latent attention and experts",
    "gpt2": "LayerNorm, GELU, learned positions and fused qkv weights", "gpt_neox": "LayerNorm, GELU and "
    "parallel attention + MLP", "olmo2": "norms after attention and MLP, q/k norms over all heads",
    "falcon": "LayerNorm, GELU and parallel attention + MLP", "stablelm": "LayerNorm and partial rotary embeddings",
}


def hf_arch(cfg: TinyMindConfig, wanted: str | None = None) -> str:
    """The transformers family a model exports as: ``wanted`` (the one it was imported from) when that
    family computes it, else qwen3 for q/k norms, qwen2 for q/k/v biases, llama otherwise."""
    fits = {"llama": not cfg.qk_norm and not cfg.qkv_bias, "mistral": not cfg.qk_norm and not cfg.qkv_bias,
            "qwen2": not cfg.qk_norm and cfg.qkv_bias, "qwen3": cfg.qk_norm and not cfg.qkv_bias}
    if wanted in fits and fits[wanted]:
        return wanted
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def hf_config(cfg: TinyMindConfig, arch: str, dtype: str, tokens: dict | None = None) -> dict:
    """config.json for ``arch`` (a key of ARCHS); rope is written the transformers 4 way (rope_theta,
    rope_scaling) and the transformers 5 way (rope_parameters), so both read it. ``tokens``: bos/eos/pad
    ids (default TinyMind's 1/2/0)."""
    if cfg.qk_norm and arch != "qwen3":
        raise TinyMindError(f"this model has q/k norms (qk_norm), which {ARCHS[arch]} lacks; "
                            "export it with --arch qwen3 (or --arch auto)")
    if arch == "qwen3" and not cfg.qk_norm:
        raise TinyMindError("Qwen3ForCausalLM always normalises q and k, this model does not (qk_norm off); "
                            "export it with --arch llama (or --arch auto)")
    if cfg.qkv_bias != (arch == "qwen2"):
        have = "has" if cfg.qkv_bias else "lacks"
        raise TinyMindError(f"this model {have} q/k/v biases (qkv_bias), {ARCHS[arch]} "
                            f"{'always has them' if arch == 'qwen2' else 'has none (or one on o_proj too)'}; "
                            "export it with --arch auto")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    tokens = tokens or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    d = {
        "architectures": [ARCHS[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "rope_parameters": rope,
        "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_word_embeddings,
        **tokens, "use_cache": True, "initializer_range": 0.02, "torch_dtype": dtype, "dtype": dtype,
    }
    if arch == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "mistral":
        d.update(sliding_window=None)
    else:   # qwen2 (q/k/v biases built in) and qwen3 (attention_bias off)
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers,
                 layer_types=["full_attention"] * cfg.num_hidden_layers)
        if arch == "qwen3":
            d.update(attention_bias=False)
    return d


def rope_scaling_from_hf(d: dict) -> dict | None:
    """TinyMind's rope_scaling for a config.json: None for plain RoPE, Llama 3's as a dict; refused: the rest
    (its numbers are checked by TinyMindConfig, ``check_rope_scaling``; ``config_from_hf`` names the file)."""
    # transformers 5 writes rope_parameters, transformers 4 rope_scaling; a file may hold both: read each
    scalings = [r for r in (d.get("rope_parameters"), d.get("rope_scaling"))
                if isinstance(r, dict) and r.get("rope_type", r.get("type", "default")) != "default"]
    if not scalings:
        return None
    rope = scalings[0]
    kind = rope.get("rope_type", rope.get("type"))
    if kind != "llama3":
        raise TinyMindError(f"rope scaling {kind!r} is not supported (TinyMind computes plain RoPE and "
                            "Llama 3's 'llama3' scaling)")
    scaling = {"rope_type": "llama3", **{k: rope.get(k) for k in ROPE_SCALING_KEYS}}
    if any({k: r.get(k) for k in ROPE_SCALING_KEYS} != {k: scaling[k] for k in ROPE_SCALING_KEYS} for r in scalings):
        raise TinyMindError(f"rope_parameters and rope_scaling disagree ({scalings})")
    return scaling


def config_from_hf(d: dict, where) -> TinyMindConfig:
    """TinyMind's config for a config.json, or a TinyMindError naming what TinyMind cannot compute."""
    arch = d.get("model_type")
    names = d.get("architectures") or [ARCHS.get(arch, "")]
    if arch not in ARCHS or names[0] != ARCHS[arch]:
        lacks = f" (TinyMind lacks {LACKS[arch]})" if arch in LACKS else ""
        raise TinyMindError(f"{where}: architecture {names[0] or arch!r} (model_type {arch!r}) is not "
                            f"supported{lacks}; TinyMind reads {', '.join(ARCHS.values())}")
    if d.get("attention_bias") and arch != "qwen2":
        raise TinyMindError(f"{where}: attention_bias=True is not supported (a bias on o_proj, which "
                            "TinyMind's attention lacks)")
    if d.get("mlp_bias"):
        raise TinyMindError(f"{where}: mlp_bias=True is not supported (TinyMind's MLP has no biases)")
    window = d.get("sliding_window") if arch == "mistral" else d.get("use_sliding_window") and d.get("sliding_window")
    types = set(d.get("layer_types") or ["full_attention"])
    if window or types != {"full_attention"}:
        raise TinyMindError(f"{where}: sliding window attention (sliding_window {d.get('sliding_window')}, "
                            f"layer_types {sorted(types)}) is not supported (TinyMind attends to the whole context)")
    if d.get("hidden_act", "silu") != "silu":
        raise TinyMindError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (TinyMind uses silu)")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise TinyMindError(f"{where}: pretraining_tp {d['pretraining_tp']} is not supported")
    rope = d.get("rope_parameters") or {}
    try:
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        return TinyMindConfig(
            vocab_size=int(d["vocab_size"]), hidden_size=hidden, num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            intermediate_size=int(d["intermediate_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), qk_norm=arch == "qwen3",
            head_dim=int(d["head_dim"]) if d.get("head_dim") else None, qkv_bias=arch == "qwen2",
            rope_scaling=rope_scaling_from_hf(d))
    except KeyError as e:
        raise TinyMindError(f"{where}: config lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise TinyMindError(f"{where}: bad config value ({e})") from None
    except TinyMindError as e:
        raise TinyMindError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- weights

def tie_lm_head(state: dict, cfg: TinyMindConfig, where) -> dict:
    """Files of tied models may leave ``lm_head.weight`` out (transformers does): it is the embedding."""
    emb = state.get("model.embed_tokens.weight")
    if not cfg.tie_word_embeddings or emb is None:
        return state
    head = state.get("lm_head.weight")
    if head is None:
        return {**state, "lm_head.weight": emb}
    if head.shape != emb.shape or not torch.equal(head, emb):
        raise TinyMindError(f"{where}: tie_word_embeddings is set but lm_head.weight differs from "
                            "model.embed_tokens.weight")
    return state


def to_float32(state: dict) -> dict:
    """TinyMind keeps fp32 weights (training updates them); fp16/bf16 -> fp32 is exact."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


# ----------------------------------------------------------------------------- transformers folders

def tokenizer_config(max_len: int) -> dict:
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE_JINJA,
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len, "padding_side": "left", "extra_special_tokens": {},
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in enumerate(specials)},
    }


def special_ids(tok) -> dict:
    """bos/eos/pad ids for config.json: TinyMind's 1/2/0, or an imported tokenizer's own (eos: every
    end-of-turn id, a list where there are several, as Llama 3's config.json has it)."""
    if tok.chat is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    stop = list(tok.stop_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": stop[0] if len(stop) == 1 else stop,
            "pad_token_id": tok.pad_id if tok.pad_token is not None else None}


def export_hf(state: dict, cfg: TinyMindConfig, out: Path, tokenizer_path: Path, arch: str,
              dtype: str = "float32") -> list[Path]:
    """Write a transformers folder; weights first, config last (a folder with a config is complete).
    An imported model's tokenizer goes back with its own files (chat template, generation config)."""
    tok = load_model_tokenizer(tokenizer_path, cfg.vocab_size, "the model")   # checked before anything is written
    config = hf_config(cfg, arch, dtype, special_ids(tok))
    weights = {k: v.to(DTYPES[dtype]) for k, v in state.items()
               if not (cfg.tie_word_embeddings and k == "lm_head.weight")}   # tied: stored once, as HF does
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(weights, out / "model.safetensors")
    with atomic_write(out / "tokenizer.json") as tmp:
        shutil.copyfile(tok.path, tmp)
    if tok.chat is not None:
        for name, path in companion_files(tok.path).items():
            if path.is_file():
                with atomic_write(out / name) as tmp:
                    shutil.copyfile(path, tmp)
        if not companion_files(tok.path)["generation_config.json"].is_file():
            write_json(out / "generation_config.json", {k: v for k, v in config.items() if k.endswith("_token_id")})
    else:
        write_json(out / "tokenizer_config.json", tokenizer_config(cfg.max_position_embeddings))
        write_json(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                                                     "pad_token": PAD_TOKEN})
        write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                    "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    write_json(out / "config.json", config)
    return sorted(out.iterdir())


def read_hf(folder: Path) -> tuple[TinyMindConfig, dict]:
    """(config, fp32 state dict with TinyMind's names) of a transformers folder."""
    if not folder.is_dir():
        raise TinyMindError(f"transformers folder not found: {folder}")
    cfg = config_from_hf(read_json(folder / "config.json", "config.json"), folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        state = read_safetensors(folder / "model.safetensors", "weights")
    elif index.is_file():   # sharded: {"weight_map": {name: file}}
        shards = sorted(set(read_json(index, "index").get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard, "weight shard"))
    elif (folder / "pytorch_model.bin").is_file():
        state = safe_load(folder / "pytorch_model.bin", "weight file")
    else:
        have = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise TinyMindError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"(it holds {have})")
    state = tie_lm_head(state, cfg, folder)
    check_state_dict(state, expected_shapes(cfg), folder)
    return cfg, to_float32(state)


# ----------------------------------------------------------------------------- PEFT adapters

def lora_variant(obj: dict) -> str:
    """The variant a TinyMind LoRA file names (in its lora_config or at the top level); plain LoRA if none."""
    return str(obj.get("lora_config", {}).get("variant") or obj.get("variant") or "lora")


# variant -> adapter_config.json settings beyond rank/alpha/targets; the adapter tensors of these are A and B.
# A variant PEFT has (DoRA, VeRA, ...) gets an entry here once TinyMind's file for it is mapped.
PEFT_VARIANTS: dict[str, dict] = {
    "lora": {},
    "rslora": {"use_rslora": True},
}


def peft_variant(obj: dict, where) -> dict:
    """The PEFT settings for the file's variant, or a TinyMindError naming the variant."""
    variant = lora_variant(obj)
    if variant not in PEFT_VARIANTS:
        raise TinyMindError(f"{where}: LoRA variant {variant!r} has no PEFT export yet (known: "
                            f"{', '.join(PEFT_VARIANTS)}); export the merged model instead: --to hf --lora_weight")
    return PEFT_VARIANTS[variant]


def compact_targets(model, names: list[str]) -> list[str]:
    """Suffixes (``q_proj``, ...) when they select exactly ``names`` on ``model``, else the full names."""
    suffixes = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    if sorted(find_targets(model, ",".join(suffixes))) == sorted(names):
        return suffixes
    return list(names)


def export_peft(obj: dict, model, out: Path, base_model: str) -> list[Path]:
    """Write a PEFT adapter folder from a TinyMind LoRA file ``obj`` already checked against ``model``."""
    settings = peft_variant(obj, "LoRA file")
    lc, adapter = obj["lora_config"], obj["adapter"]
    names = list(dict.fromkeys(k.rpartition(".")[0] for k in adapter))   # module names, model order
    bad = [k for k in adapter if k.rpartition(".")[2] not in ("lora_A", "lora_B")]
    if bad:
        raise TinyMindError(f"LoRA tensors {bad[:3]} have no PEFT name for variant {lora_variant(obj)!r}")
    embedding = {n for n in names if is_embedding(model.get_submodule(n))}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(lc["rank"]), "lora_alpha": float(lc["alpha"]), "lora_dropout": float(lc.get("dropout", 0.0)),
        "target_modules": compact_targets(model, names), "use_rslora": bool(lc.get("use_rslora", False)),
        "init_lora_weights": "gaussian" if lc.get("init") == "gaussian" else True,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_dora": False,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "revision": None,
        **settings,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors({peft_key(k, k.rpartition(".")[0] in embedding): v for k, v in adapter.items()},
                      out / "adapter_model.safetensors")
    write_json(out / "adapter_config.json", config)
    return sorted(out.iterdir())


def peft_key(key: str, embedding: bool) -> str:
    """PEFT's name of "<module>.lora_A": "...<module>.lora_A.weight" (an nn.Linear inside PEFT), or, on an
    embedding, "...<module>.lora_embedding_A" (a bare parameter, same [r, vocab] / [dim, r] shapes)."""
    module, _, leaf = key.rpartition(".")
    return f"{PEFT_PREFIX}{module}.lora_embedding_{leaf[-1]}" if embedding else f"{PEFT_PREFIX}{key}.weight"


def read_peft(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LoRAConfig fields, {"<module>.lora_A"/"lora_B": tensor}) of a PEFT LoRA adapter folder.
    Only what TinyMind's LoRA computes is accepted; anything else is refused by its PEFT name."""
    if not folder.is_dir():
        raise TinyMindError(f"PEFT adapter folder not found: {folder}")
    where = folder / "adapter_config.json"
    c = read_json(where, "adapter_config.json")
    if c.get("peft_type") != "LORA":
        raise TinyMindError(f"{where}: peft_type {c.get('peft_type')!r} is not supported (TinyMind reads LORA)")
    for key, ok in (("use_dora", not c.get("use_dora")), ("bias", c.get("bias", "none") == "none"),
                    ("modules_to_save", not c.get("modules_to_save")), ("rank_pattern", not c.get("rank_pattern")),
                    ("alpha_pattern", not c.get("alpha_pattern")), ("fan_in_fan_out", not c.get("fan_in_fan_out")),
                    ("layers_to_transform", c.get("layers_to_transform") is None),
                    ("lora_bias", not c.get("lora_bias")), ("use_qalora", not c.get("use_qalora")),
                    ("init_lora_weights", c.get("init_lora_weights", True) in (True, False, "gaussian"))):
        if not ok:
            raise TinyMindError(f"{where}: {key}={c.get(key)!r} is not supported by TinyMind's LoRA")
    weights = folder / "adapter_model.safetensors"
    state = read_safetensors(weights, "adapter weights") if weights.is_file() else \
        safe_load(folder / "adapter_model.bin", "adapter weights")
    adapter = {}
    for key, t in state.items():
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        if body is not None and body.endswith((".lora_embedding_A", ".lora_embedding_B")):
            adapter[body.replace(".lora_embedding_", ".lora_")] = t.float()   # "<module>.lora_A" / "lora_B"
            continue
        if body is None or not body.endswith((".lora_A.weight", ".lora_B.weight")):
            raise TinyMindError(f"{weights.name}: unknown adapter tensor {key!r} (TinyMind reads "
                                f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight / .lora_embedding_A / _B)")
        adapter[body[:-len(".weight")]] = t.float()
    if not adapter:
        raise TinyMindError(f"{weights.name}: no LoRA tensors")
    try:
        fields = dict(rank=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                      use_rslora=bool(c.get("use_rslora", False)),
                      init="gaussian" if c.get("init_lora_weights") == "gaussian" else "kaiming")
    except (KeyError, TypeError, ValueError) as e:
        raise TinyMindError(f"{where}: missing or bad r / lora_alpha ({e})") from None
    return fields, adapter
