"""LoRA (Low-Rank Adaptation), written out by hand.

A frozen linear layer y = W x (W: [out, in]) learns a low-rank update instead of a new W:

    y = W x + s * B (A x)        A: [r, in], B: [out, r], r << min(in, out)
    s = alpha / r                (rsLoRA: s = alpha / sqrt(r))

B starts at zero, so the wrapped model starts out computing exactly what the base model computed.
Only A and B (r * (in + out) numbers per layer) are trained; W is never touched.

What this file implements, top to bottom:
- ``LoRAConfig``: rank, alpha, targets, dropout, rsLoRA and the init of A (saved in every LoRA file).
- ``LoRALinear``: an explicit wrapper module around an ``nn.Linear`` (no patched ``forward``) holding any
  number of named adapters; ``merge()`` / ``unmerge()`` fold the active ones into W (in fp32, idempotent).
- ``LoRAEmbedding``: the same update on the token embedding (target ``embed_tokens``).
- ``VARIANTS``: where the variants in ``model/lora_variants/`` plug in; plain LoRA needs none of them.
- ``apply_lora``: wrap the target layers with a new adapter, freeze everything else.
- ``merge_lora`` / ``unmerge_lora`` / ``base_state_dict``: fold adapters in (no extra inference cost) and
  get the weights back under the plain model's names, so a merged model needs no LoRA code at all.
- ``save_lora`` / ``load_lora``: self-describing adapter files, checked against the base model on load.

Beside it: ``lora_fused.py`` (``LoRALinear.forward``'s loop with cheaper products, the same function),
``lora_targets.py`` (which layers ``targets`` selects), ``lora_file.py`` (what a LoRA file holds, the
checks on load), ``lora_adapters.py`` (several adapters in one model: switch, disable, combine).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError, atomic_save, repo_path
from model.lora_file import (check_base_config, check_base_weights, check_companions, layer_tensors, lora_file,
                             read_lora_file)
from model.lora_fused import fused_applies, fused_lora
from model.lora_targets import select_targets
from model.model import check_state_dict, state_fingerprint, unwrap_model

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"             # adapter names become attribute names inside ParameterDict


@dataclass
class LoRAConfig:
    rank: int = 8                    # r: inner size of the update B @ A
    alpha: float = 16.0              # scaling = alpha / r (or alpha / sqrt(r)): change r without retuning the lr
    targets: str = DEFAULT_TARGETS   # comma list of module-name suffixes, "all-linear", or "re:<regex>" (fullmatch)
    dropout: float = 0.0             # dropout on the LoRA branch's input only; the base path always sees clean x
    use_rslora: bool = False         # rsLoRA: alpha / sqrt(r) keeps the update's size stable as r grows
    init: str = "kaiming"            # init of A: "kaiming" (uniform, as nn.Linear) or "gaussian" (std 1/r)
    variant: str = "lora"            # a name in model/lora_variants (dora, vera, pissa, ...); "lora" = this file
    options: dict = field(default_factory=dict)   # the variant's own hyper-parameters (saved with the file)

    def __post_init__(self):
        if isinstance(self.targets, (list, tuple)):
            self.targets = ",".join(self.targets)
        for ok, rule in ((isinstance(self.rank, int) and self.rank >= 1, "rank must be a positive integer"),
                         (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
                         (self.init in ("kaiming", "gaussian"), "init must be 'kaiming' or 'gaussian'")):
            if not ok:
                raise TinyMindError(f"LoRA {rule}; got {self}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise TinyMindError(f"unknown LoRA config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


class LoRALinear(nn.Module):
    """y = base(x) + sum over active adapters of scaling * B(A(dropout(x))); ``base`` stays frozen."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base                       # the original layer; its weight keeps its values (and dtype)
        self.in_features, self.out_features = self.sizes(base)
        self.lora_A = nn.ParameterDict()       # adapter name -> [r, in]
        self.lora_B = nn.ParameterDict()       # adapter name -> [out, r]
        self.lora_dropout = nn.ModuleDict()    # adapter name -> Dropout or Identity
        self.variants = nn.ModuleDict()        # adapter name -> a variant's own branch (DoRA, VeRA, AdaLoRA)
        self.scaling: dict[str, float] = {}    # adapter name -> s
        self.configs: dict[str, LoRAConfig] = {}
        self.active: tuple[str, ...] = ()      # a tuple: torch.compile guards on it cheaply, no graph breaks
        self.merged_adapters: tuple[str, ...] = ()   # the adapters now folded into base.weight

    @staticmethod
    def sizes(base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def init_pair(self, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (A [r, in], B [out, r]): A random, B zero, so the update starts at zero."""
        w = self.base.weight
        A = torch.empty(cfg.rank, self.in_features, device=w.device, dtype=w.dtype)
        if cfg.init == "kaiming":  # same init nn.Linear gives its weight: U(-1/sqrt(in), 1/sqrt(in))
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1.0 / cfg.rank)
        return A, torch.zeros(self.out_features, cfg.rank, device=w.device, dtype=w.dtype)

    def add_adapter(self, name: str, cfg: LoRAConfig, scaling: float | None = None):
        layer_cls = variant_hooks(cfg.variant).layer
        if layer_cls is not None:   # the variant builds its own tensors (and maybe A and B: uses_ab)
            self.variants[name] = layer_cls(self, cfg).train(self.training)
        A, B = self.init_pair(cfg)
        if layer_cls is None or layer_cls.uses_ab:
            self.lora_A[name] = nn.Parameter(A)
            self.lora_B[name] = nn.Parameter(B)
        drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_dropout[name] = drop.train(self.training)   # a new module starts in train mode: follow ours
        self.scaling[name] = cfg.scaling if scaling is None else scaling
        self.configs[name] = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        if fused_applies(self, x):    # the same function with fewer, cheaper products: model/lora_fused.py
            name = self.active[0]
            return fused_lora(x, self.base.weight, self.lora_A[name], self.lora_B[name], self.scaling[name])
        y = self.base(x)
        if self.merged:  # the update already lives inside base.weight
            return y
        base_y = y                                                  # DoRA rescales the base output
        for name in self.active:
            if name in self.variants:                               # a variant computes its own branch
                y = y + self.variants[name](self, name, x, base_y).to(y.dtype)
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x).to(A.dtype)             # (..., in)
            z = F.linear(h, A) * self.scaling[name]                 # (..., r): scale the small tensor, not the output
            # z @ B^T = F.linear(z, B); model/lora_fused.py computes the common case with cheaper products
            y = y + (z @ B.t()).to(y.dtype)                         # (..., out)
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update this adapter adds to W, in fp32: s * B @ A, shape [out, in]."""
        if name in self.variants:
            return self.variants[name].delta_weight(self, name)
        return self.scaling[name] * (self.lora_B[name].float() @ self.lora_A[name].float())

    @torch.no_grad()
    def merge(self):
        """W <- W + sum of active deltas, summed in fp32 and cast once. A second call does nothing."""
        if self.merged or not self.active:
            return
        if getattr(self.base, "quantized", False):
            raise TinyMindError("cannot merge exactly into a 4-bit (NF4) base: load the adapter on the "
                                "full-precision base (it loads there unchanged) and merge that")
        w = self.base.weight
        delta = sum(self.delta_weight(n) for n in self.active)
        w.copy_((w.float() + delta).to(w.dtype))
        self.merged_adapters = self.active

    @torch.no_grad()
    def unmerge(self):
        """Subtract the same fp32 delta ``merge`` added (an fp32 W comes back to within float rounding)."""
        if not self.merged:
            return
        w = self.base.weight
        delta = sum(self.delta_weight(n) for n in self.merged_adapters)
        w.copy_((w.float() - delta).to(w.dtype))
        self.merged_adapters = ()

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.configs.items()}
        return f"ranks={ranks}, active={self.active}, merged={self.merged}"


class LoRAEmbedding(LoRALinear):
    """LoRA on a token embedding (PEFT: ``target_modules=["embed_tokens"]``).

    Looking up row ``i`` of the embedding E [vocab, dim] is the linear map W x with W = E^T [dim, vocab] and
    x the one-hot vector of ``i``. So the update is LoRALinear's, with in = vocab and out = dim:

        E'[i] = E[i] + s * B @ A[:, i]          A: [r, vocab], B: [dim, r]

    and ``A x`` is column ``i`` of A: a lookup too (``F.embedding(ids, A^T)``), never a vocab-sized product.
    Every token owns r numbers (its column of A), all tokens share B: what new knowledge keyed on a word needs.

    As in PEFT, A starts at zero and B is random, but at the embedding's own std (~0.1), not N(0, 1): one
    step of A moves a row by a fraction of its length. A tied LM head keeps reading the frozen E (``merge``
    unties them). Only variants with ``supports_embedding`` adapt it (plain LoRA, LoRA+).
    """

    @staticmethod
    def check_variant(cfg: LoRAConfig):
        if not variant_hooks(cfg.variant).supports_embedding:
            allowed = [n for n, v in VARIANTS.items() if v.supports_embedding]
            raise TinyMindError(f"LoRA variant {cfg.variant!r} adapts linear layers only; drop embed_tokens from "
                                f"the targets (embedding adapters: {', '.join(allowed)})")

    @staticmethod
    def sizes(base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim   # (in, out) of the one-hot view

    def init_pair(self, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """A zero, B random at the embedding's own scale (the other way round from a linear layer)."""
        w = self.base.weight
        A = torch.zeros(cfg.rank, self.in_features, device=w.device, dtype=w.dtype)
        B = torch.randn(self.out_features, cfg.rank, device=w.device, dtype=w.dtype)
        return A, B * w.detach().float().std().to(w.dtype)

    def add_adapter(self, name: str, cfg: LoRAConfig, scaling: float | None = None):
        self.check_variant(cfg)
        super().add_adapter(name, cfg, scaling)
        self.lora_dropout[name] = nn.Identity()   # ids have nothing to drop (PEFT applies none here either)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (...) -> (..., dim)
        y = self.base(ids)
        if self.merged:
            return y
        for name in self.active:
            z = F.embedding(ids, self.lora_A[name].t()) * self.scaling[name]   # (..., r): column ids of A
            y = y + (z @ self.lora_B[name].t()).to(y.dtype)                   # (..., dim)
        return y

    @torch.no_grad()
    def merge(self):
        """E <- E + (sum of deltas)^T, into a new tensor: the old one may be the tied LM head's, which
        must keep reading the frozen E. ``merge_lora`` then marks the model untied."""
        if self.merged or not self.active:
            return
        w = self.base.weight
        delta = sum(self.delta_weight(n) for n in self.active).t()          # [vocab, dim]
        self._unmerged = (w,)                      # a tuple: not registered as a parameter of this module
        self.base.weight = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False)
        self.merged_adapters = self.active

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.base.weight = self._unmerged[0]       # the original (tied) tensor itself, bit for bit
        del self._unmerged
        self.merged_adapters = ()


# ----------------------------------------------------------------------------- variants: how they plug in

# name -> hooks; importing model/lora_variants registers its variants here (its ``Variant`` documents the four
# hooks this file calls: layer, supports_embedding, setup, export). Plain LoRA works with none registered.
VARIANTS: dict = {"lora": SimpleNamespace(name="lora", layer=None, supports_embedding=True, setup=None, export=None)}


def variant_hooks(name: str):
    if name not in VARIANTS:
        hint = " (importing model.lora_variants registers the variants)" if len(VARIANTS) == 1 else ""
        raise TinyMindError(f"unknown LoRA variant {name!r}; choose one of {', '.join(VARIANTS)}{hint}")
    return VARIANTS[name]


# ----------------------------------------------------------------------------- finding and wrapping layers

def is_embedding(module: nn.Module) -> bool:
    """A token embedding, plain or already wrapped."""
    return isinstance(module, (nn.Embedding, LoRAEmbedding))


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every ``LoRALinear`` with its plain module name (DDP / torch.compile wrappers stripped)."""
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)]


def adapter_names(model: nn.Module, active_only: bool = False) -> tuple[str, ...]:
    """Names of the loaded (or only the active) adapters, in the order they were added."""
    return tuple(dict.fromkeys(n for _, m in lora_modules(model) for n in (m.active if active_only else m.configs)))


def find_targets(model: nn.Module, targets: str) -> list[str]:
    """Module names ``targets`` selects (which layers can be selected, and how: model/lora_targets.py)."""
    core = unwrap_model(model)
    return select_targets(core, targets, {n for n, _ in lora_modules(core)}, is_embedding)


def require_adapters(model: nn.Module, what: str, names=()):
    """Every name in ``names`` is a loaded adapter, and nothing is merged (else ``what`` is refused)."""
    loaded = adapter_names(model)
    for n in names:
        if n not in loaded:
            raise TinyMindError(f"no adapter named {n!r}; loaded: {', '.join(loaded) or 'none'}")
    if any(m.merged for _, m in lora_modules(model)):
        raise TinyMindError(f"cannot {what} while adapters are merged into the weights; call unmerge_lora(model) first")


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, adapter_name: str = "default", **cfg_overrides) -> dict:
    """Wrap the target layers with a new adapter ``adapter_name``, the only trainable tensor in the model;
    return ``dict(wrapped=[module names], trainable=int, total=int)``. ``cfg_overrides`` (rank=, alpha=, ...)
    replace fields of ``cfg``; ``None`` values are ignored, so a script can pass its flags straight through.
    Call it before wrapping the model in DDP or torch.compile."""
    bad = set(cfg_overrides) - {f.name for f in fields(LoRAConfig)}
    if bad:
        raise TinyMindError(f"unknown LoRA option(s): {', '.join(sorted(bad))}")
    cfg = replace(cfg or LoRAConfig(), **{k: v for k, v in cfg_overrides.items() if v is not None})
    if not re.fullmatch(NAME_RE, adapter_name) or adapter_name in adapter_names(model):
        raise TinyMindError(f"adapter name {adapter_name!r} is already loaded or not a valid name (letters, digits, _)")
    require_adapters(model, "add an adapter")
    variant = variant_hooks(cfg.variant)           # an unknown variant fails before anything changes
    core = unwrap_model(model)
    names = find_targets(core, cfg.targets)   # raises before anything is changed
    if any(is_embedding(core.get_submodule(n)) for n in names):
        LoRAEmbedding.check_variant(cfg)
    active = adapter_names(core, active_only=True)
    for name in names:
        layer = core.get_submodule(name)
        if not isinstance(layer, LoRALinear):  # swap the nn.Linear for a wrapper that holds it
            parent, _, child = name.rpartition(".")
            wrapper = LoRAEmbedding if isinstance(layer, nn.Embedding) else LoRALinear
            layer = wrapper(layer).train(layer.training)
            setattr(core.get_submodule(parent), child, layer)
        layer.add_adapter(adapter_name, cfg)
    for _, m in lora_modules(core):            # the new adapter joins the active ones
        m.active = tuple(n for n in active + (adapter_name,) if n in m.configs)
    for n, p in core.named_parameters():       # train the new adapter only; base and older adapters stay frozen
        p.requires_grad = (n.endswith(f".lora_A.{adapter_name}") or n.endswith(f".lora_B.{adapter_name}")
                           or f".variants.{adapter_name}." in n)
    if variant.setup is not None:              # e.g. VeRA: the random matrices all layers share
        variant.setup(core, adapter_name)
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    return dict(wrapped=names, trainable=trainable, total=sum(p.numel() for p in core.parameters()))


# ----------------------------------------------------------------------------- merging

def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights: forward then costs what the plain model costs. Merging
    into a tied embedding unties it (the LM head keeps the frozen matrix), and the config says so."""
    for _, m in lora_modules(model):
        m.merge()
    _sync_tie_flag(model)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model):
        m.unmerge()
    _sync_tie_flag(model)
    return model


def _sync_tie_flag(model: nn.Module):
    core = unwrap_model(model)
    head, cfg = getattr(core, "lm_head", None), getattr(core, "config", None)
    if head is not None and hasattr(cfg, "tie_word_embeddings") and any(
            isinstance(m, LoRAEmbedding) for _, m in lora_modules(core)):
        cfg.tie_word_embeddings = any(m.weight is head.weight for m in core.modules() if isinstance(m, nn.Embedding))


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights under the plain model's names ("...q_proj.base.weight" -> "...q_proj.weight")."""
    core = unwrap_model(model)
    wrapped = {n for n, _ in lora_modules(core)}
    out = {}
    for key, value in core.state_dict().items():
        parts = key.rsplit(".", 2)                 # [module, "base" | "lora_A" | "lora_B", leaf]
        if len(parts) == 3 and parts[0].removesuffix(".variants") in wrapped:   # (variants: [module.variants, name, leaf])
            if parts[1] == "base":
                out[f"{parts[0]}.{parts[2]}"] = value
            continue                               # adapter tensors are not base weights
        out[key] = value
    return out


# ----------------------------------------------------------------------------- files (their layout: lora_file.py)

def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` by plain module name ("model.layers.0.self_attn.q_proj.lora_A", ...)."""
    return {f"{n}.{k}": t for n, m in lora_modules(model) for k, t in layer_tensors(m, name).items()}


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights *as loaded*. Variants that rewrite the frozen base for training
    (PiSSA's residual, QLoRA's 4-bit copy) record the original one first in ``lora_base_fingerprint``."""
    core = unwrap_model(model)
    return getattr(core, "lora_base_fingerprint", None) or state_fingerprint(base_state_dict(core))


def save_lora(model: nn.Module, path, adapter_name: str = "default", **extra) -> Path:
    """Write one adapter atomically as a self-describing file (what it holds: ``model/lora_file.py``), its
    tensors under plain module names ("model.layers.0.self_attn.q_proj.lora_A": [r, in], ...) and ``extra``
    (step=, from_weight=) beside. A variant may export another form (PiSSA: a plain LoRA of rank 2r)."""
    require_adapters(model, "save a LoRA file", [adapter_name])   # the fingerprint is of the *unmerged* base
    core = unwrap_model(model)
    cfg = next(m.configs[adapter_name] for _, m in lora_modules(core) if adapter_name in m.configs)
    export = variant_hooks(cfg.variant).export
    cfg, adapter = export(core, adapter_name) if export is not None else (cfg, adapter_state(core, adapter_name))
    over = [{"name": n, "fingerprint": state_fingerprint(adapter_state(core, n))}
            for n in adapter_names(core, active_only=True) if n != adapter_name]
    obj = lora_file(adapter_name, extra, cfg.to_dict(), core.config.to_dict(), base_fingerprint(core), over, adapter)
    return atomic_save(obj, repo_path(path))


def _expected_state(core: nn.Module, names: list[str], cfg: LoRAConfig) -> dict[str, tuple]:
    """Key -> shape of the adapter ``cfg`` builds on layers ``names``, from a probe on the meta device."""
    expected = {}
    for n in names:
        layer = core.get_submodule(n)
        if is_embedding(layer):
            probe = LoRAEmbedding(nn.Embedding(*LoRAEmbedding.sizes(getattr(layer, "base", layer)), device="meta"))
        else:
            probe = LoRALinear(nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta"))
        probe.add_adapter("probe", cfg)
        expected.update({f"{n}.{k}": tuple(t.shape) for k, t in layer_tensors(probe, "probe").items()})
    return expected


def load_lora(model: nn.Module, path, adapter_name: str | None = None, force: bool = False) -> str:
    """Add the adapter stored in ``path`` (rank, alpha, targets come from the file) and return its name.

    Everything is checked before the model is touched: the format; that the file fits this base model
    (config, weight fingerprint, companion adapters active; ``force=True`` skips only these); and that its
    keys and shapes are exactly those its targets produce here. Like ``apply_lora``'s, it joins the active
    adapters and is the only trainable tensor.
    """
    path = repo_path(path)
    obj = read_lora_file(path)
    core = unwrap_model(model)
    try:
        cfg = LoRAConfig.from_dict(obj["lora_config"])
        if not force:
            check_base_config(obj, core.config.to_dict(), path)
            require_adapters(core, "check a LoRA file against the base weights")
            check_base_weights(obj, base_fingerprint(core), path)
            active = {state_fingerprint(adapter_state(core, n)): n for n in adapter_names(core, active_only=True)}
            check_companions(obj, active, path)
        state, expected = obj["adapter"], _expected_state(core, find_targets(core, cfg.targets), cfg)
    except TinyMindError as e:
        raise TinyMindError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    check_state_dict(state, expected, path, what="adapter keys", hint=f" (rank {cfg.rank})")
    name = adapter_name or obj.get("lora_name") or path.stem
    apply_lora(core, cfg, adapter_name=name)
    with torch.no_grad():
        for key, t in adapter_state(core, name).items():
            t.copy_(state[key])
    return name
