"""LoRA (Low-Rank Adaptation), written out by hand.

A frozen linear layer y = W x (W: [out, in]) learns a low-rank update instead of a new W:

    y = W x + s * B (A x)        A: [r, in], B: [out, r], r << min(in, out)
    s = alpha / r                (rsLoRA: s = alpha / sqrt(r))

B starts at zero, so the wrapped model starts out computing exactly what the base model computed.
Only A and B (r * (in + out) numbers per layer) are trained; W is never touched.

What this file implements:
- ``LoRAConfig``: rank, alpha, targets, dropout, rsLoRA and the init of A (a dataclass, saved in every LoRA file).
- ``LoRALinear``: an explicit wrapper module around an ``nn.Linear`` (no patched ``forward``) holding any
  number of named adapters; ``merge()`` / ``unmerge()`` fold the active ones into W (in fp32, idempotent).
- ``LoRAEmbedding``: the same update on the token embedding (target ``embed_tokens``): every token gets
  r trainable numbers of its own, which is what new knowledge keyed on a word needs.
- ``apply_lora``: wrap the target layers (suffix list, ``all-linear`` or ``re:<regex>``), freeze the rest.
- ``save_lora`` / ``load_lora``: self-describing adapter files, checked against the base model on load.
- ``merge_lora`` / ``unmerge_lora`` / ``base_state_dict``: fold adapters in (no extra inference cost) and
  get the weights back under the plain model's names, so a merged model needs no LoRA code at all.
- ``set_active_adapters`` / ``disable_adapters`` / ``combine_adapters``: several adapters in one model.

The variants (DoRA, VeRA, PiSSA, QLoRA, ...) live beside this file in ``model/lora_variants/``; the only
trace of them here is ``LoRAConfig.variant``/``options`` and ``LoRALinear.variants``: a variant whose
layer computes its branch differently puts a module there, and ``forward``/``delta_weight`` defer to it.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError, atomic_save, repo_path, safe_load
from model.model import state_fingerprint, unwrap_model

LORA_FORMAT = "tinymind-lora"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RUNTIME_ONLY_KEYS = ("dropout", "flash_attn")   # base-config keys that do not change the weights: not compared
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


class FusedLoRA(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for a frozen W, computed as y = x (W + s B A)^T, with the backward written out.

    ``LoRALinear.forward``'s loop is the readable definition; this is the same function (to float
    rounding) with fewer and cheaper products, used where ``LoRALinear.fused_applies`` allows. Why:
    the loop's thin products (x A^T, z B^T, the add, and four more in the backward) each stream a whole
    (rows, in) or (rows, out) activation through memory for very little arithmetic, and autograd lays
    two of them out in the form a CPU's BLAS runs slowest; on a CPU they ate much of what a frozen W
    saves (scripts/bench.py, ``lora_step`` and ``unmerged_forward``, times both ways). Here:

        forward   W' = W + s B A          (out, in): one small product, cheaper than z B^T plus the add
                  y  = x W'^T             the base's product, with the update inside
                  z  = x A^T              (rows, r), kept (as z^T) for dB
        backward  dz = s dy B             (rows, r)
                  dB = s dy^T z           (out, r)
                  dA = dz^T x             (r, in)
                  dx = dy W + dz A        no dW: W is frozen (LoRA's saving)

    These are the chain rule for y = x W^T + s z B^T, z = x A^T: what autograd derives from the loop.
    tests/test_lora.py checks outputs and every gradient against the loop, and gradcheck in fp64.
    """

    @staticmethod
    def forward(ctx, x, W, A, B, s: float):
        y = F.linear(x, torch.addmm(W, B, A, alpha=s))                    # (..., out)
        zt = A @ x.reshape(-1, W.shape[1]).t()                             # z^T = A x^T: (r, rows), for dB
        ctx.save_for_backward(x, W, A, B, zt)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, zt = ctx.saved_tensors
        s, (need_x, _, need_A, need_B, _) = ctx.s, ctx.needs_input_grad
        dy2 = dy.reshape(-1, W.shape[0])                                   # (rows, out)
        # Each product is written so that BLAS streams the long (rows) side contiguously:
        # (B^T dy^T)^T rather than dy B, (z^T dy)^T rather than dy^T z (2-5x faster on a CPU).
        dz = (B.t() @ dy2.t()).t() * s                                     # (rows, r)
        dA = dz.t() @ x.reshape(-1, W.shape[1]) if need_A else None        # (r, in)
        dB = (zt @ dy2).t() * s if need_B else None                        # (out, r)
        dx = None
        if need_x:
            dx = (dy2 @ W).addmm_(dz, A).view(*dy.shape[:-1], W.shape[1])  # dy W + dz A: (..., in)
        return dx, None, dA, dB, None


def fused_lora(x, W, A, B, s: float) -> torch.Tensor:
    """``FusedLoRA`` where a gradient is wanted; without one (evaluation), just x (W + s B A)^T."""
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return FusedLoRA.apply(x, W, A, B, s)
    return F.linear(x, torch.addmm(W, B, A, alpha=s))


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
        from model.lora_variants import variant_layer   # the registry imports this file: import it late
        layer_cls = variant_layer(cfg.variant)
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
        if self.fused and self.fused_applies(x):    # same function, fewer and cheaper products (see below)
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
            # z @ B^T = F.linear(z, B); FusedLoRA (above) computes the common case with cheaper products
            y = y + (z @ B.t()).to(y.dtype)                         # (..., out)
        return y

    # False: always the plain loop above (tests compare the two; bench times both)
    fused: bool = True

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Where ``FusedLoRA`` computes exactly what the loop in ``forward`` computes, and is cheaper.

        One plain adapter (no variant module, no dropout at work) on an unmerged, frozen nn.Linear, all in
        fp32 or fp64 without autocast (in bf16, W + s B A would round small updates away), and enough rows
        that forming W + s B A (reads and writes in * out numbers) costs less than the branch's thin
        products on x and y (about rows * (in + out)): a training batch or a prompt, not one decoded token.
        """
        if self.merged or len(self.active) != 1 or self.variants or type(self.base) is not nn.Linear:
            return False
        name, w = self.active[0], self.base.weight
        A = self.lora_A[name]
        rows = x.numel() // self.in_features
        return (self.base.bias is None and not w.requires_grad and w.dtype in (torch.float32, torch.float64)
                and x.dtype == w.dtype == A.dtype and not torch.is_autocast_enabled(x.device.type)
                and not (self.training and isinstance(self.lora_dropout[name], nn.Dropout))
                and rows * (self.in_features + self.out_features) >= self.in_features * self.out_features)

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

    def lora_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') in fp32 with B' @ A' = delta_weight(name): how ``combine_adapters`` concatenates ranks."""
        if name in self.variants:
            return self.variants[name].lora_pair(self, name)
        return self.scaling[name] * self.lora_B[name].detach().float(), self.lora_A[name].detach().float()

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.configs.items()}
        return f"ranks={ranks}, active={self.active}, merged={self.merged}"


class LoRAEmbedding(LoRALinear):
    """LoRA on a token embedding (PEFT: ``target_modules=["embed_tokens"]``).

    Looking up row ``i`` of the embedding E [vocab, dim] is the linear map W x with W = E^T [dim, vocab] and
    x the one-hot vector of ``i``. So the update is LoRALinear's, with in = vocab and out = dim:

        E'[i] = E[i] + s * B @ A[:, i]          A: [r, vocab], B: [dim, r]

    and ``A x`` is column ``i`` of A: a lookup too (``F.embedding(ids, A^T)``), never a vocab-sized product.
    Every token owns r numbers (its column of A) and all tokens share B. That is what a frozen model
    lacks when new knowledge hangs on a word: the 62 condition names of the medical data are single tokens
    whose frozen rows the pretraining gave no reason to tell apart; their columns of A can.

    As in PEFT, A starts at zero (the update starts at zero) and B is random; PEFT draws B from N(0, 1),
    made for embeddings of unit scale, while TinyMind's rows have std ~0.1, so B is drawn at the
    embedding's own std (one step of A moves a row by a fraction of its length, not several times it).
    Only the lookup changes: a tied LM head keeps reading the frozen E (``merge`` unties them).
    Plain LoRA (and LoRA+, which only changes the optimizer) only: the variants adapt linear layers.
    """
    VARIANTS = ("lora", "lora_plus")

    @classmethod
    def check_variant(cls, cfg: LoRAConfig):
        if cfg.variant not in cls.VARIANTS:
            raise TinyMindError(f"LoRA variant {cfg.variant!r} adapts linear layers only; drop embed_tokens from "
                                f"the targets (embedding adapters: {', '.join(cls.VARIANTS)})")

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


# ----------------------------------------------------------------------------- finding and wrapping layers

def is_embedding(module: nn.Module) -> bool:
    """A token embedding, plain or already wrapped."""
    return isinstance(module, (nn.Embedding, LoRAEmbedding))


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every ``LoRALinear`` with its plain module name (DDP / torch.compile wrappers stripped)."""
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, LoRALinear)]


def adapter_names(model: nn.Module, active_only: bool = False) -> tuple[str, ...]:
    """Names of the loaded (or only the active) adapters, in the order they were added."""
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        names.update(dict.fromkeys(m.active if active_only else m.configs))
    return tuple(names)


def find_targets(model: nn.Module, targets: str) -> list[str]:
    """Module names ``targets`` selects; a suffix or regex that matches nothing is an error.

    Candidates are the linear layers (or existing wrappers) except anything sharing an embedding's weight
    (the tied lm_head) and ``lm_head`` itself: the vocabulary projection is never adapted. The token
    embedding is a candidate too, but only when named in the list (``embed_tokens``), never by ``all-linear``
    or a regex.
    """
    core = unwrap_model(model)
    tied = {id(m.weight) for m in core.modules() if isinstance(m, nn.Embedding)}
    wrapped = {n for n, _ in lora_modules(core)}
    cands = [n for n, m in core.named_modules() if n in wrapped or (
        isinstance(m, (nn.Linear, nn.Embedding)) and n.rpartition(".")[0] not in wrapped and n != "lm_head"
        and (isinstance(m, nn.Embedding) or id(m.weight) not in tied))]
    linear = [n for n in cands if not is_embedding(core.get_submodule(n))]
    if targets == "all-linear":
        return linear
    if targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as e:
            raise TinyMindError(f"LoRA targets {targets!r}: bad regex ({e})") from None
        names = [n for n in linear if pattern.fullmatch(n)]
        if not names:
            raise TinyMindError(f"LoRA targets {targets!r} match no layer (names look like {cands[:2]})")
        return names
    names = []
    for suffix in [t.strip() for t in targets.split(",") if t.strip()]:
        hits = [n for n in cands if n == suffix or n.endswith("." + suffix)]
        if not hits:
            known = sorted({n.rpartition(".")[2] for n in cands})
            raise TinyMindError(f"LoRA target {suffix!r} matches no layer; known: {', '.join(known)}")
        names += [n for n in hits if n not in names]
    return names


def _require(model: nn.Module, what: str, names=()):
    """Every name in ``names`` is a loaded adapter, and nothing is merged (else ``what`` is refused)."""
    loaded = adapter_names(model)
    for n in names:
        if n not in loaded:
            raise TinyMindError(f"no adapter named {n!r}; loaded: {', '.join(loaded) or 'none'}")
    if any(m.merged for _, m in lora_modules(model)):
        raise TinyMindError(f"cannot {what} while adapters are merged into the weights; call unmerge_lora(model) first")


def _set_active(model: nn.Module, names: tuple[str, ...]):
    for _, m in lora_modules(model):
        m.active = tuple(n for n in names if n in m.configs)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, adapter_name: str = "default", **cfg_overrides) -> dict:
    """Wrap the target layers with a new adapter ``adapter_name`` and freeze everything else.

    ``cfg_overrides`` (rank=, alpha=, targets=, ...) replace fields of ``cfg``; ``None`` values are ignored, so
    a script can pass its flags straight through. The new adapter joins the active ones and is the only
    trainable tensor in the model. Call it before wrapping the model in DDP or torch.compile.
    Returns ``dict(wrapped=[module names], trainable=int, total=int)``.
    """
    bad = set(cfg_overrides) - {f.name for f in fields(LoRAConfig)}
    if bad:
        raise TinyMindError(f"unknown LoRA option(s): {', '.join(sorted(bad))}")
    cfg = replace(cfg or LoRAConfig(), **{k: v for k, v in cfg_overrides.items() if v is not None})
    if not re.fullmatch(NAME_RE, adapter_name) or adapter_name in adapter_names(model):
        raise TinyMindError(f"adapter name {adapter_name!r} is already loaded or not a valid name (letters, digits, _)")
    _require(model, "add an adapter")
    from model.lora_variants import get_variant   # the registry imports this file: import it late
    variant = get_variant(cfg.variant)             # an unknown variant fails before anything changes
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
    _set_active(core, active + (adapter_name,))
    for n, p in core.named_parameters():       # train the new adapter only; base and older adapters stay frozen
        p.requires_grad = (n.endswith(f".lora_A.{adapter_name}") or n.endswith(f".lora_B.{adapter_name}")
                           or f".variants.{adapter_name}." in n)
    if variant.setup is not None:              # e.g. VeRA: the random matrices all layers share
        variant.setup(core, adapter_name)
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    return dict(wrapped=names, trainable=trainable, total=sum(p.numel() for p in core.parameters()))


# ----------------------------------------------------------------------------- switching, merging, combining

def set_active_adapters(model: nn.Module, names):
    """Choose which adapters run: a name, ``"a,b"``, a list of names, or ``None`` / ``"off"`` for none."""
    if names is None or names == "off":
        names = ()
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    _require(model, "switch adapters", names)
    _set_active(model, tuple(dict.fromkeys(names)))


@contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` runs the plain base model; the active adapters come back after."""
    _require(model, "disable adapters")
    saved = [(m, m.active) for _, m in lora_modules(model)]
    try:
        _set_active(model, ())
        yield model
    finally:
        for m, active in saved:
            m.active = active


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights: forward then costs what the plain model costs.
    An embedding adapter merged into a tied embedding unties it (the LM head keeps the frozen matrix), and
    the config says so, so that a merged checkpoint saves and loads both matrices."""
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


def combine_adapters(model: nn.Module, names, weights, new_name: str) -> str:
    """Add adapter ``new_name`` whose update is exactly sum_i w_i * s_i * B_i @ A_i, and make it the active one.

    Exact because the ranks are concatenated, not averaged (scaling of the new adapter: 1):
        A_new = cat_i(A_i)              [sum r_i, in]
        B_new = cat_i(w_i * s_i * B_i)  [out, sum r_i]    so B_new @ A_new = sum_i w_i * s_i * B_i @ A_i
    A layer lacking one of the adapters gets zero rows / columns for it, so every layer has the same rank.
    """
    names, weights = list(names), [float(w) for w in weights]
    if not names or len(names) != len(weights):
        raise TinyMindError(f"combine_adapters: {len(names)} names but {len(weights)} weights")
    if not re.fullmatch(NAME_RE, new_name) or new_name in adapter_names(model):
        raise TinyMindError(f"combine_adapters: {new_name!r} is already loaded or not a valid name")
    _require(model, "combine adapters", names)
    mods = [(n, m) for n, m in lora_modules(model) if any(a in m.configs for a in names)]
    pairs = [{a: m.lora_pair(a) for a in names if a in m.configs} for _, m in mods]   # (s * B, A) per layer
    ranks = [next(p[a][1].shape[0] for p in pairs if a in p) for a in names]
    # alpha = rank -> scaling 1; targets = the exact module names, so load_lora rebuilds the same layers
    cfg = LoRAConfig(rank=sum(ranks), alpha=float(sum(ranks)), targets=",".join(n for n, _ in mods))
    for (_, m), pair in zip(mods, pairs):
        dev = m.base.weight.device
        As = [pair[a][1] if a in pair else torch.zeros(r, m.in_features, device=dev)
              for a, r in zip(names, ranks)]
        Bs = [w * pair[a][0] if a in pair
              else torch.zeros(m.out_features, r, device=dev) for a, w, r in zip(names, weights, ranks)]
        m.add_adapter(new_name, cfg, scaling=1.0)
        with torch.no_grad():
            m.lora_A[new_name].copy_(torch.cat(As, dim=0))   # [sum r, in]
            m.lora_B[new_name].copy_(torch.cat(Bs, dim=1))   # [out, sum r]
        m.lora_A[new_name].requires_grad_(False)             # a combination is for inference: frozen
        m.lora_B[new_name].requires_grad_(False)
    _set_active(model, (new_name,))
    return new_name


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


# ----------------------------------------------------------------------------- files

def _layer_state(m: LoRALinear, name: str) -> dict[str, torch.Tensor]:
    """One layer's tensors of adapter ``name``: "lora_A" [r, in], "lora_B" [out, r], and a variant's own."""
    out = {}
    if name in m.lora_A:
        out["lora_A"] = m.lora_A[name].detach()
        out["lora_B"] = m.lora_B[name].detach()
    if name in m.variants:   # DoRA: "magnitude" [out]; VeRA: "vera_b" [out], "vera_d" [r]; ...
        out.update({k: t.detach() for k, t in m.variants[name].state_dict().items()})
    return out


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` by plain module name ("model.layers.0.self_attn.q_proj.lora_A", ...)."""
    return {f"{n}.{k}": t for n, m in lora_modules(model) for k, t in _layer_state(m, name).items()}


def base_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the base weights *as loaded*. Variants that rewrite the frozen base for training
    (PiSSA's residual, QLoRA's 4-bit copy) record the original one first in ``lora_base_fingerprint``."""
    core = unwrap_model(model)
    return getattr(core, "lora_base_fingerprint", None) or state_fingerprint(base_state_dict(core))


def save_lora(model: nn.Module, path, adapter_name: str = "default", **extra) -> Path:
    """Write one adapter, atomically, as a dict that ``torch.load(weights_only=True)`` reads back:

        {"format": "tinymind-lora", "lora_name": str, **extra, "lora_config": LoRAConfig.to_dict(),
         "base_config": base TinyMindConfig.to_dict(), "base_fingerprint": 16 hex digits of the unmerged base,
         "trained_over": [{"name", "fingerprint"} of every other adapter that was active: it needs them],
         "adapter": {"model.layers.0.self_attn.q_proj.lora_A": [r, in], "...q_proj.lora_B": [out, r], ...}}

    Keys hold no adapter name and no DDP / compile prefix. ``lora_name`` defaults to ``adapter_name``;
    the fixed keys come after ``**extra``, so extra metadata (step=, from_weight=) can never replace them.
    A variant may write its adapter in another form (PiSSA: as a plain LoRA of rank 2r on the original base).
    """
    from model.lora_variants import export_adapter
    _require(model, "save a LoRA file", [adapter_name])   # the fingerprint is of the *unmerged* base
    core = unwrap_model(model)
    cfg, adapter = export_adapter(core, adapter_name)
    over = [{"name": n, "fingerprint": state_fingerprint(adapter_state(core, n))}
            for n in adapter_names(core, active_only=True) if n != adapter_name]
    return atomic_save({"format": LORA_FORMAT, "lora_name": adapter_name, **extra,
                        "lora_config": cfg.to_dict(),
                        "base_config": core.config.to_dict(),
                        "base_fingerprint": base_fingerprint(core),
                        "trained_over": over,
                        "adapter": {k: t.cpu().clone() for k, t in adapter.items()}}, repo_path(path))


def _check_companions(core: nn.Module, obj: dict, path: Path):
    """An adapter trained on top of others only works with them: each must be loaded and active."""
    active = {state_fingerprint(adapter_state(core, n)): n for n in adapter_names(core, active_only=True)}
    for other in obj.get("trained_over") or ():
        if other.get("fingerprint") not in active:
            raise TinyMindError(f"{path} was trained on top of adapter {other.get('name')!r} (fingerprint "
                                f"{other.get('fingerprint')}), which is not active; load that file first")


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
        expected.update({f"{n}.{k}": tuple(t.shape) for k, t in _layer_state(probe, "probe").items()})
    return expected


def _check_base(core: nn.Module, obj: dict, path: Path):
    """Refuse a LoRA file trained on another base model: other config, or same config with other weights."""
    mine, theirs = core.config.to_dict(), obj["base_config"]
    diff = [k for k in sorted(set(mine) | set(theirs)) if k not in RUNTIME_ONLY_KEYS and mine.get(k) != theirs.get(k)]
    if diff:
        what = ", ".join(f"{k} {theirs.get(k)!r} vs {mine.get(k)!r}" for k in diff[:4])
        raise TinyMindError(f"{path} was made for another base model (file vs model: {what}); force=True loads it anyway")
    _require(core, "check a LoRA file against the base weights")
    fp = base_fingerprint(core)
    if fp != obj["base_fingerprint"]:
        needs = (obj["lora_config"].get("options") or {}).get("base_weight")   # Delta-LoRA changed W as well
        hint = f"; it belongs on the base it wrote beside it: --weight {needs}" if isinstance(needs, str) else ""
        raise TinyMindError(f"{path} was trained on other base weights (fingerprint {obj['base_fingerprint']} vs {fp}: "
                            f"same config, another checkpoint){hint}; force=True loads it anyway")


def load_lora(model: nn.Module, path, adapter_name: str | None = None, force: bool = False) -> str:
    """Add the adapter stored in ``path`` (rank, alpha, targets come from the file) and return its name.

    Everything is checked before the model is touched: the format; that the file fits this base model (same
    config and weight fingerprint; ``force=True`` skips only this check); and that its keys and shapes are
    exactly those its targets produce on this model (no silent partial loads). The adapter joins the
    active ones and, like a new one from ``apply_lora``, is the only trainable tensor (so training can go on).
    """
    path = repo_path(path)
    obj = safe_load(path, "LoRA file")
    if obj.get("format") != LORA_FORMAT:
        hint = " (it is a full model checkpoint: pass it as --weight)" if obj.get("format") == "tinymind-model" else ""
        raise TinyMindError(f"{path} is not a TinyMind LoRA file (format {obj.get('format')!r}){hint}")
    bad = [k for k, t in (("lora_config", dict), ("base_config", dict), ("base_fingerprint", str), ("adapter", dict))
           if not isinstance(obj.get(k), t)]
    if bad:
        raise TinyMindError(f"{path}: LoRA file lacks (or has a malformed) {', '.join(bad)}")
    core = unwrap_model(model)
    try:
        cfg = LoRAConfig.from_dict(obj["lora_config"])
        if not force:
            _check_base(core, obj, path)
            _check_companions(core, obj, path)
        names = find_targets(core, cfg.targets)
        state, expected = obj["adapter"], _expected_state(core, names, cfg)   # lora_A [r, in], lora_B [out, r]
    except TinyMindError as e:
        raise TinyMindError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    for label, keys in (("missing", sorted(set(expected) - set(state))), ("unknown", sorted(set(state) - set(expected)))):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            raise TinyMindError(f"{path}: {len(keys)} {label} adapter keys: {', '.join(keys[:3])}{more}")
    for key, shape in expected.items():
        if not torch.is_tensor(state[key]) or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if torch.is_tensor(state[key]) else type(state[key]).__name__
            raise TinyMindError(f"{path}: {key} has shape {got}, expected {shape} (rank {cfg.rank})")
    name = adapter_name or obj.get("lora_name") or path.stem
    apply_lora(core, cfg, adapter_name=name)
    with torch.no_grad():
        for key, t in adapter_state(core, name).items():
            t.copy_(state[key])
    return name
