"""Prompt learners (CoOp, CoOp-CSC, CoCoOp) over a frozen :class:`ClipBackbone`.

The prompt of class k is the token-embedding sequence of CoOp::

    [SOS] ctx_1 .. ctx_M [name_k tokens] . [EOT] [pad ...]        (class_token_position="end")

with the learnable context ``ctx`` in place of M placeholder tokens "X". As in CoOp the sequence is
kept as three pieces: ``token_prefix`` (n_cls, 1, D) = embedding of SOS, ``ctx`` (M, D) or (n_cls, M, D),
and ``token_suffix`` (n_cls, L-1-M, D) = embeddings of the name tokens, ".", EOT and padding of the
tokenised text "X X .. X {name}.". The suffix layout is the same for every class-token position: for
"middle" and "front" the name rows are moved in front of / between the context rows at assembly time,
which leaves the EOT position unchanged. State-dict keys are CoOp's (``ctx``, ``token_prefix``,
``token_suffix``, ``meta_net.linear1.weight`` ...) so Dassl checkpoints load without renaming.

The backbone is referenced, not registered as a submodule: a learner's ``state_dict()`` holds only the
prompt (what a provider delivers). :class:`scanner.prompting.classifier.PromptedCLIP` owns both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from scanner.clip.backbone import ClipBackbone
from scanner.errors import ConfigError
from scanner.prompting.classnames import simple_tokenizer

#: forward-only prompt encoder: embeds (N, L, D), EOT positions (N,) -> text features (N, E)
PromptEncoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Position = Literal["end", "middle", "front"]
POSITIONS: tuple[str, ...] = ("end", "middle", "front")
DEFAULT_N_CTX = 16
_PLACEHOLDER = "X"  # CoOp's placeholder word: one BPE token, replaced by the learnable context


def clean_classname(name: str) -> str:
    """CoOp's normalisation of a class name ("golden_retriever" -> "golden retriever")."""
    return name.replace("_", " ").strip()


class PromptLearner(nn.Module):
    """Base class of every prompt learner: the shared prompt assembly and the common interface.

    Subclasses set ``learner_type`` and ``image_conditioned`` and implement :meth:`text_features`.
    """

    image_conditioned: ClassVar[bool] = False
    _backbone: ClipBackbone  # referenced, not a submodule (see module docstring)
    #: used instead of the backbone when gradients are disabled (see PromptedCLIP.use_forward_only)
    forward_prompts: PromptEncoder | None = None
    ctx: nn.Parameter  # (M, D), or (n_cls, M, D) class-specific: set by subclasses

    token_prefix: torch.Tensor
    token_suffix: torch.Tensor
    tokenized_prompts: torch.Tensor
    eot_index: torch.Tensor
    assembly_index: torch.Tensor

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], *, n_ctx: int,
                 class_token_position: str = "end", init: str | None = None) -> None:
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ConfigError(
                f"class_token_position must be one of {', '.join(POSITIONS)}; got {class_token_position!r}"
            )
        if not classnames:
            raise ConfigError("a prompt learner needs at least one class name; got an empty list")
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1; got {n_ctx}")
        object.__setattr__(self, "_backbone", backbone)
        self.classnames: list[str] = [clean_classname(c) for c in classnames]
        self.n_ctx = int(n_ctx)
        self.class_token_position: str = class_token_position
        self.init: str | None = init

        tok = simple_tokenizer()
        length = backbone.context_length
        name_lens = [len(tok.encode(name)) for name in self.classnames]
        # SOS + ctx + name + "." + EOT must fit, or the tokenizer would silently cut the EOT away.
        too_long = [(n, k) for n, k in zip(self.classnames, name_lens, strict=True)
                    if 1 + n_ctx + k + 2 > length]
        if too_long:
            name, k = too_long[0]
            raise ConfigError(
                f"class name {name!r} is {k} tokens: with n_ctx={n_ctx} the prompt needs {1 + n_ctx + k + 2} "
                f"tokens but the backbone's context length is {length}; shorten the name or lower n_ctx"
            )
        placeholder = " ".join([_PLACEHOLDER] * n_ctx)
        tokens = backbone.tokenize([f"{placeholder} {name}." for name in self.classnames])  # (n_cls, L)
        with torch.no_grad():  # a learner is built on the CPU wherever the backbone is; .to() moves it
            embedding = backbone.token_embedding(tokens.to(backbone.token_embedding.weight.device)).float().cpu()
        self.register_buffer("token_prefix", embedding[:, :1, :].clone())  # (n_cls, 1, D): SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :].clone())  # (n_cls, L-1-M, D)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # (n_cls, L)
        self.register_buffer("eot_index", tokens.argmax(dim=-1), persistent=False)  # (n_cls,)
        # rows the text encoder needs: up to the last EOT (the rest is padding a causal encoder's EOT never reads)
        self.text_length = int(self.eot_index.max()) + 1
        order = _assembly_index(name_lens, n_ctx, length, class_token_position)
        self.register_buffer("assembly_index", order, persistent=False)  # (n_cls, L)

    # ----------------------------------------------------------------- interface
    @property
    def backbone(self) -> ClipBackbone:
        return self._backbone

    @property
    def learner_type(self) -> str:
        """"coop", "coop-csc" or "cocoop" (the name used in configs, metadata and reports)."""
        raise NotImplementedError

    @property
    def n_cls(self) -> int:
        return len(self.classnames)

    @property
    def csc(self) -> bool:
        return False

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Text features, not normalised: (n_cls, E), or (B, n_cls, E) for image-conditioned learners."""
        raise NotImplementedError

    def forward(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_features(image_features)

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`learner_from_config` rebuilds an equal learner."""
        return {
            "learner_type": self.learner_type,
            "n_ctx": self.n_ctx,
            "csc": self.csc,
            "class_token_position": self.class_token_position,
            "init": self.init,
            "n_cls": self.n_cls,
        }

    # ----------------------------------------------------------------- assembly
    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings (..., n_cls, L, D) from context (..., n_cls, M, D) (leading dims broadcast)."""
        lead = ctx.shape[:-3]
        prefix = self.token_prefix.to(ctx.dtype).expand(*lead, -1, -1, -1)
        suffix = self.token_suffix.to(ctx.dtype).expand(*lead, -1, -1, -1)
        prompts = torch.cat([prefix, ctx, suffix], dim=-2)  # the "end" layout
        if self.class_token_position == "end":
            return prompts
        # Other positions are a per-class permutation of the "end" rows: one gather, no Python loop.
        index = self.assembly_index.view(*([1] * len(lead)), self.n_cls, -1, 1)
        index = index.expand(*lead, -1, -1, prompts.shape[-1])
        return torch.gather(prompts, -2, index)

    def encode(self, prompts: torch.Tensor) -> torch.Tensor:
        """Text features (..., n_cls, E) of assembled prompts (..., n_cls, L, D).

        With gradients disabled and ``forward_prompts`` set, that function encodes instead of the backbone.
        """
        lead = prompts.shape[:-2]
        flat = prompts.reshape(-1, *prompts.shape[-2:])  # (N, L, D)
        eot = self.eot_index.expand(*lead).reshape(-1)
        if self.forward_prompts is not None and not torch.is_grad_enabled():
            return self.forward_prompts(flat, eot).reshape(*lead, -1)  # an exported graph takes the full length
        # the padding after the last EOT cut away: same features, a fraction of the cost (CoCoOp encodes
        # B x n_cls prompts per step; the bundled CLIP's 32-token context holds 10-20 rows of prompt)
        return self.backbone.encode_prompts(flat[:, : self.text_length], eot).reshape(*lead, -1)


def _assembly_index(name_lens: Sequence[int], n_ctx: int, length: int, position: str) -> torch.Tensor:
    """Per class, the order (L,) in which rows of the "end" layout [SOS, ctx(M), name, rest] are read."""
    rows = []
    for k in name_lens:
        sos = [0]
        ctx = list(range(1, 1 + n_ctx))
        name = list(range(1 + n_ctx, 1 + n_ctx + k))
        rest = list(range(1 + n_ctx + k, length))
        if position == "front":
            order = sos + name + ctx + rest
        elif position == "middle":
            half = n_ctx // 2
            order = sos + ctx[:half] + name + ctx[half:] + rest
        else:
            order = sos + ctx + name + rest
        rows.append(order)
    return torch.tensor(rows, dtype=torch.long)


def _phrase_embedding(backbone: ClipBackbone, phrase: str) -> torch.Tensor:
    """Token embeddings (M, D) of ``phrase`` (no SOS/EOT); M = its number of BPE tokens."""
    n = len(simple_tokenizer().encode(phrase))
    if n == 0:
        raise ConfigError(f"the context init phrase {phrase!r} has no tokens; give words or init=None")
    tokens = backbone.tokenize([phrase])
    with torch.no_grad():
        emb = backbone.token_embedding(tokens.to(backbone.token_embedding.weight.device))  # (1, L, D)
        return emb[0, 1:1 + n, :].float().cpu().clone()


def _initial_ctx(backbone: ClipBackbone, init: str | None, n_ctx: int | None, shape_lead: tuple[int, ...],
                 seed: int) -> tuple[torch.Tensor, int]:
    """Initial context (*shape_lead, M, D) and M: from a phrase, or N(0, 0.02) from ``seed``."""
    width = backbone.text_width
    if init is not None:
        phrase = _phrase_embedding(backbone, init)
        if n_ctx is not None and n_ctx != phrase.shape[0]:
            raise ConfigError(
                f"init phrase {init!r} is {phrase.shape[0]} tokens but n_ctx={n_ctx}; leave n_ctx unset "
                "to use the phrase length"
            )
        m = phrase.shape[0]
        return phrase.expand(*shape_lead, m, width).clone(), m
    m = DEFAULT_N_CTX if n_ctx is None else n_ctx
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape_lead, m, width, generator=gen) * 0.02, m


class CoOpLearner(PromptLearner):
    """CoOp: a learnable context shared by all classes (M, D), or class-specific (n_cls, M, D) with csc."""

    image_conditioned: ClassVar[bool] = False

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], *, n_ctx: int | None = None,
                 csc: bool = False, class_token_position: str = "end", init: str | None = None,
                 seed: int = 0) -> None:
        """``n_ctx`` defaults to 16 (random init) or to the phrase's token count (``init`` given)."""
        lead = (len(classnames),) if csc else ()
        ctx, m = _initial_ctx(backbone, init, n_ctx, lead, seed)
        super().__init__(backbone, classnames, n_ctx=m, class_token_position=class_token_position, init=init)
        self._csc = bool(csc)
        self.ctx = nn.Parameter(ctx)  # (M, D) or (n_cls, M, D)

    @property
    def learner_type(self) -> str:
        return "coop-csc" if self._csc else "coop"

    @property
    def csc(self) -> bool:
        return self._csc

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(n_cls, E); ``image_features`` is ignored (CoOp prompts do not depend on the image)."""
        ctx = self.ctx if self._csc else self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return self.encode(self.assemble(ctx))


class CoCoOpLearner(PromptLearner):
    """CoCoOp: a shared context plus a per-image bias from a meta-net on the normalised image feature.

    meta_net = Linear(E -> hidden) - ReLU - Linear(hidden -> D), hidden = E // 16 by default; the bias
    (B, D) is added to every context token. Cost: one text-transformer call over B * n_cls prompts per
    forward (vs n_cls for CoOp), so training and inference scale with batch size times class count.
    """

    image_conditioned: ClassVar[bool] = True

    def __init__(self, backbone: ClipBackbone, classnames: Sequence[str], *, n_ctx: int | None = None,
                 class_token_position: str = "end", init: str | None = None, meta_hidden: int | None = None,
                 seed: int = 0) -> None:
        ctx, m = _initial_ctx(backbone, init, n_ctx, (), seed)
        super().__init__(backbone, classnames, n_ctx=m, class_token_position=class_token_position, init=init)
        self.ctx = nn.Parameter(ctx)  # (M, D)
        embed = backbone.embed_dim
        self.meta_hidden = int(meta_hidden) if meta_hidden is not None else max(1, embed // 16)
        # Seeded without touching the global RNG: the default nn.Linear init, drawn from ``seed``.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(embed, self.meta_hidden)),
                ("relu", nn.ReLU(inplace=True)),
                ("linear2", nn.Linear(self.meta_hidden, backbone.text_width)),
            ]))

    @property
    def learner_type(self) -> str:
        return "cocoop"

    def config(self) -> dict[str, Any]:
        return {**super().config(), "meta_hidden": self.meta_hidden}

    def text_features(self, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_cls, E) from image features (B, E) (normalised here; raw features are fine)."""
        if image_features is None:
            raise ConfigError("a CoCoOp learner needs image features: its prompts depend on the image")
        feats = F.normalize(image_features, dim=-1)
        bias = self.meta_net(feats.to(self.ctx.dtype))  # (B, D)
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, M, D)
        ctx = ctx.unsqueeze(1).expand(-1, self.n_cls, -1, -1)  # (B, n_cls, M, D)
        return self.encode(self.assemble(ctx))  # one encoder call over B * n_cls rows


LEARNER_TYPES: tuple[str, ...] = ("coop", "coop-csc", "cocoop")


def learner_from_config(backbone: ClipBackbone, classnames: Sequence[str], config: dict[str, Any], *,
                        seed: int = 0) -> PromptLearner:
    """A freshly initialised learner of the type and shape described by ``config`` (see ``config()``)."""
    kind = config.get("learner_type", "coop")
    position = str(config.get("class_token_position", "end"))
    n_ctx = config.get("n_ctx")
    init = config.get("init")
    if kind in ("coop", "coop-csc"):
        csc = bool(config.get("csc", kind == "coop-csc"))
        return CoOpLearner(backbone, classnames, n_ctx=n_ctx, csc=csc, class_token_position=position,
                           init=init, seed=seed)
    if kind == "cocoop":
        return CoCoOpLearner(backbone, classnames, n_ctx=n_ctx, class_token_position=position, init=init,
                             meta_hidden=config.get("meta_hidden"), seed=seed)
    raise ConfigError(f"unknown learner type {kind!r}; expected one of {', '.join(LEARNER_TYPES)}")
