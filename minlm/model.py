"""The language model: token embedding -> blocks -> final norm -> (tied) head.

Dimension letters: B batch, T time, C model width, V vocabulary.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

import minlm.fast as fast
import minlm.tracing as tracing
from minlm.config import ModelConfig
from minlm.loss import masked_cross_entropy
from minlm.modules import Block, MoE, make_norm
from minlm.modules.registry import make_position
from minlm.modules.fastpath import joint_linear
from minlm.modules.skips import unet_skips
from minlm.modules.value_embed import ValueEmbeddings
from minlm.modules.norm import split_step
from minlm.tracing import Identity, LoggingModule

# projections that write to the residual stream (mixer outputs, MLP or KAN down)
RESIDUAL_OUTPUTS = ("o_proj.weight", "out_proj.weight", "down.weight", "down.base_weight",
                    "down.spline_weight")
# T-Fixup shrinks the value path: values, outputs, MLP (and MLGRU candidate) weights
TFIXUP_SHRUNK = ("v_proj.weight", "o_proj.weight", "cand_proj.weight", "up.weight",
                 "gate.weight", "down.weight", "embed.weight")
# parameter names before the mixer registry (run folders and checkpoints saved then):
# the token mixer was a block's ``attn`` child, the MLGRU candidate projection ``c_proj``
_BLOCK_CHILD = r"^(blocks\.\d+\.(?:parallel\d*\.branches\.)?)"
_LEGACY_KEYS = ((re.compile(_BLOCK_CHILD + r"attn\.c_proj\."), r"\1mixer.cand_proj."),
                (re.compile(_BLOCK_CHILD + r"attn\."), r"\1mixer."))


def remap_legacy_keys(state_dict: dict, prefix: str = "") -> None:
    """Rename, in place, the keys of a state dict saved before the registry to today's names
    (``blocks.0.attn.q_proj`` -> ``blocks.0.mixer.q_proj``, MLGRU ``c_proj`` -> ``cand_proj``)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        new = key[len(prefix):]
        for pattern, repl in _LEGACY_KEYS:
            new = pattern.sub(repl, new)
        if prefix + new != key and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(key)


def _value_kwargs(values: list | None, i: int) -> dict:
    """Block i's mixer arguments for value embeddings: its table's lookup, if it has one."""
    return {} if values is None or values[i] is None else {"value_embed": values[i]}


class LM(LoggingModule):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = make_position(cfg, "input") or Identity()  # learned table, sinusoids, ...
        self.drop = nn.Dropout(cfg.dropout)
        blocks: list[nn.Module] = []
        for i in range(cfg.n_layers):
            source = cfg.tied_blocks.get(str(i))
            blocks.append(blocks[source] if source is not None else Block(cfg, i))
        self.blocks = nn.ModuleList(blocks)
        # tricks of modded-nanogpt: value-embedding tables, U-net skips (absent when off)
        self.value_embeds = ValueEmbeddings(cfg) if cfg.value_embeds else None
        self.unet_skips = unet_skips(cfg.n_layers, cfg.unet_skips)
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # MoE layers report their load-balancing losses here (a plain list: not submodules)
        self._moe_layers = [m for m in self.modules() if isinstance(m, MoE)]
        self.aux_loss = torch.zeros(())  # last forward's mean load-balancing loss (0 without MoE)
        self.init_weights()
        # every load_state_dict (load_run, resume, fine-tuning) accepts pre-registry names
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *args: remap_legacy_keys(sd, prefix))

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style ``normal`` (residual outputs scaled by 1/sqrt(2L)), ``xavier`` or ``tfixup``;
        then, with ``zero_init_proj``, the residual outputs and an untied head at zero."""
        cfg, std = self.config, self.config.std
        n_layers = cfg.n_layers
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() < 2:  # norm gains
                nn.init.ones_(p)
            elif name in ("embed.weight", "pos.weight"):
                nn.init.normal_(p, 0.0, std)
            elif cfg.init == "normal":
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(RESIDUAL_OUTPUTS) else 1.0
                nn.init.normal_(p, 0.0, std * scale)
            else:
                nn.init.xavier_normal_(p)
        if cfg.init == "tfixup":  # Huang et al. 2020: shrink value/output/MLP weights by (9L)^-1/4
            shrink = (9 * n_layers) ** -0.25
            for name, p in self.named_parameters():
                if name.endswith(TFIXUP_SHRUNK):
                    p.mul_(shrink)
        if not cfg.tie_embeddings and cfg.init != "normal":
            nn.init.normal_(self.head.weight, 0.0, std)
        for m in self.modules():  # parameters with their own rules (Mamba's A, Griffin's gates)
            if hasattr(m, "reset_special_parameters"):
                m.reset_special_parameters()
        if cfg.zero_init_proj:  # modded-nanogpt: blocks start as the identity, the head silent
            for name, p in self.named_parameters():
                if name.endswith(RESIDUAL_OUTPUTS):
                    nn.init.zeros_(p)
            if not cfg.tie_embeddings:
                nn.init.zeros_(self.head.weight)

    def _lookup_params(self) -> int:
        """Parameters of the lookup tables besides the token embedding: learned positions and
        value embeddings."""
        n = sum(p.numel() for p in self.pos.parameters())
        if self.value_embeds is not None:
            n += sum(p.numel() for p in self.value_embeds.parameters())
        return n

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (shared ones counted once); optionally without the embeddings
        (token, position and value-embedding tables)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + self._lookup_params()
        return n

    def matmul_params(self) -> int:
        """Parameters that multiply activations, what training FLOPs count: all but the lookup
        tables (a token table tied to the head counts once, as the head's matmul)."""
        n = self.num_params() - self._lookup_params()
        if self.head.weight is not self.embed.weight:
            n -= self.embed.weight.numel()
        return n

    @classmethod
    def count_params(cls, config: ModelConfig, non_embedding: bool = False,
                     matmul: bool = False) -> int:
        """Parameters of the model ``config`` describes, without building it in memory (on the
        meta device): the one count that memory estimates, search and FLOPs use, so it cannot
        drift from the model. ``non_embedding``/``matmul``: as ``num_params``/``matmul_params``."""
        with torch.device("meta"):
            model = cls(config)
        return model.matmul_params() if matmul else model.num_params(non_embedding)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None, return_logits: bool = True):
        """Logits (B, T, V) and, given targets, the mean cross-entropy over unmasked targets.

        ``return_logits=False`` (the trainer's choice) with targets, while ``minlm.fast`` is
        on, fuses the head into the loss (``minlm.fast.fused_linear_cross_entropy``: the same
        loss without holding the logits), and the logits come back as None. Soft-capped logits
        and traces always take the plain path, which returns the logits.

        ``loss_mask`` (B, T) weights each target (0 drops it); targets equal to -100 are
        ignored too. ``positions``/``cache``/``key_valid`` serve incremental decoding: block i
        gets ``cache.layer(i)`` (attention calls ``update(k, v, positions, key_valid)`` on it,
        the MLGRU reads and writes its ``state``). With mixture-of-experts layers the returned
        loss includes ``aux_loss_weight`` times the load-balancing loss in training mode only,
        and ``self.aux_loss`` holds that loss (detached) after every forward.
        """
        B, T = idx.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device)
        for m in self._moe_layers:
            m.aux_losses = []
        x = self.embed(idx)  # (B, T, C)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        x = self.drop(self.pos(x, positions))
        values = self.value_embeds(idx) if self.value_embeds is not None else None
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layer(i) if cache is not None else None
            x = self._skip_in(i, x, skips)
            x = block(x, positions=positions, cache=layer_cache, key_valid=key_valid,
                      **_value_kwargs(values, i))
            self._skip_out(i, x, skips)
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)  # (B, T, C)
        if targets is not None and not return_logits and fast.enabled() \
                and not self.config.logit_softcap and not tracing.enabled():
            loss = fast.fused_linear_cross_entropy(h, self.head.weight, targets, loss_mask)
            return None, self._with_aux(loss, self._collect_aux_loss(h))
        logits = self.head(h)  # (B, T, V)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        aux = self._collect_aux_loss(logits)
        if targets is None:
            return logits, None
        return logits, self._with_aux(masked_cross_entropy(logits, targets, loss_mask), aux)

    def step(self, idx: torch.Tensor, cache, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) after one new token per row, ``idx`` (B, 1), given ``cache`` holding
        the tokens before it (filled by a ``forward(..., cache=cache)`` prefill).

        The same modules as ``forward``, each through its ``step()`` (one token, no sequence
        axis; see ``TokenMixer.step``): the fast path of cached generation, proven equal to
        ``forward`` for every registered mixer by the tests. Eval mode; forward hooks do not
        fire (a trace records through ``forward``). ``positions`` (B, 1) for left-padded rows.
        """
        L = cache.length
        if positions is None:
            positions = torch.arange(L, L + 1, device=idx.device)  # (1,)
        x = F.embedding(idx.select(1, 0), self.embed.weight)  # (B, C)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if not isinstance(self.pos, Identity):
            x = self.pos(x.unsqueeze(1), positions.reshape(-1, 1)).squeeze(1)  # (B, C)
        values = self.value_embeds(idx.select(1, 0)) if self.value_embeds is not None else None
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = self._skip_in(i, x, skips)
            x = block.step(x, positions, cache.layer(i), **_value_kwargs(values, i))
            self._skip_out(i, x, skips)
        cache.advance(1)
        h, gain = split_step(self.norm, x)
        logits = joint_linear(self, ("head",), h, gain=gain)  # (B, V)
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def _skip_in(self, i: int, x: torch.Tensor, skips: list) -> torch.Tensor:
        """U-net skips: block i of the second half takes its mirror's output (last in, first
        out) added with a learned weight."""
        j = i - (len(self.blocks) - len(self.unet_skips))
        return self.unet_skips[j](x, skips.pop()) if j >= 0 else x

    def _skip_out(self, i: int, x: torch.Tensor, skips: list) -> None:
        if i < len(self.unet_skips):
            skips.append(x)

    def _with_aux(self, loss: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """The training loss adds the weighted load-balancing loss (MoE, training mode only)."""
        if self.training and self._moe_layers:
            loss = loss + self.config.aux_loss_weight * aux
        return loss

    def _collect_aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Mean load-balancing loss over every MoE call of this forward (tied blocks count twice)."""
        losses = [loss for m in self._moe_layers for loss in (m.aux_losses or [])]
        for m in self._moe_layers:
            m.aux_losses = None  # drop the references to this step's graph
        aux = torch.stack(losses).mean() if losses else like.new_zeros((), dtype=torch.float32)
        self.aux_loss = aux.detach()
        return aux

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LM":
        return cls(ModelConfig.from_preset(name, **overrides))

