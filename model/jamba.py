"""The Jamba language model: embeddings -> Jamba layers -> final RMSNorm -> LM head. No positional encoding.

Each layer is pre-norm: ``h = h + mixer(norm(h)); h = h + ffn(norm(h))`` where the mixer is attention or
Mamba and the ffn is a dense MLP or an MoE, as ``JambaConfig`` lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.cache import HybridCache
from model.config import JambaConfig
from model.layers.attention import Attention
from model.layers.feedforward import MLP, MoE, load_balancing_loss, router_z_loss
from model.layers.mamba import MambaMixer
from model.layers.norm import RMSNorm
from model.loss import chunked_lm_loss, lm_loss


@dataclass
class JambaOutput:
    logits: torch.Tensor | None                # None when the loss was computed in chunks (``loss_chunk``)
    loss: torch.Tensor | None = None          # LM loss (+ aux and z terms when requested)
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    expert_counts: list[torch.Tensor] = field(default_factory=list)


class JambaLayer(nn.Module):
    def __init__(self, cfg: JambaConfig, index: int):
        super().__init__()
        self.kind = "attention" if cfg.is_attention(index) else "mamba"
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if self.kind == "attention":
            self.self_attn = Attention(cfg)
        else:
            self.mamba = MambaMixer(cfg)
        self.pre_ff_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe(index) else MLP(cfg)

    def forward(self, h: torch.Tensor, segment: torch.Tensor | None = None, state=None):
        """A cache ``state`` that already holds earlier tokens is continued from, for any number of tokens."""
        x = self.input_layernorm(h)
        if self.kind == "attention":
            x = self.self_attn(x, segment=segment, kv=state)
        else:
            x = self.mamba(x, segment=segment, state=state)
        h = h + x
        y, router = self.feed_forward(self.pre_ff_layernorm(h))
        h = h + y
        if router is None:
            return h, None, None
        return h, router.logits, router.counts


class Jamba(nn.Module):
    def __init__(self, cfg: JambaConfig):
        super().__init__()
        self.cfg = cfg
        # _weight: skip nn.Embedding's own normal_ (reset_parameters draws every weight); on the meta device
        # that call alone would load torch's meta kernels, ~70 MB per process
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(JambaLayer(cfg, i) for i in range(cfg.n_layers))
        self.final_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Jamba's initialisation (``model/init.py``), keyed by parameter name: the same ``seed`` gives the
        same value to a parameter however the model is built or sharded. Default: torch's initial seed (so
        ``torch.manual_seed(s)`` before building still decides the weights). A model on the meta device
        is left for its owner to materialise and initialise."""
        from model.init import init_parameters_

        if any(p.is_meta for p in self.parameters()):
            return
        left = init_parameters_(self, torch.initial_seed() if seed is None else seed, self.cfg.init_std)
        assert not left, f"no init rule for {left}"

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                segment: torch.Tensor | None = None, cache: HybridCache | None = None,
                output_router_logits: bool = False, token_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_chunk: int = 0, logits_to_keep: int = 0,
                loss_reduction: str = "mean") -> JambaOutput:
        """input_ids [b, L]. ``labels`` are aligned with ``input_ids`` (shifted here; -100 = ignore);
        ``targets`` are already shifted (position t predicts targets[t]). With ``targets`` and ``loss_chunk``
        > 0 the loss is computed ``loss_chunk`` tokens at a time and no full logits tensor is made.
        ``loss_reduction="sum"``: ``lm_loss`` is the sum over the targets, not the mean (a context-parallel
        trainer divides by the token count of the whole sequence).

        ``segment`` [b, L]: document ids of a packed sequence; attention stays within a document and the
        pure-PyTorch Mamba path resets its state at each new document. ``cache``: an empty one is filled
        (prefill); one that has seen tokens is continued from, one token or many at a time, with the same
        logits and the same final cache as one forward over all the tokens.
        ``logits_to_keep`` > 0: logits for the last that many positions only (HF's ``num_logits_to_keep``;
        a prefill for generation needs one, and all of them would be ``L x vocab``).
        """
        if segment is not None and cache is not None and cache.seen > 0:
            raise ValueError("segment: not supported when continuing from a cache (cache.seen > 0)")
        h = self.embed_tokens(input_ids)
        router_logits, counts = [], []
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h, logits, count = checkpoint(layer, h, segment, state, use_reentrant=False)
            else:
                h, logits, count = layer(h, segment, state)
            if logits is not None:
                router_logits.append(logits)
                counts.append(count)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        h = self.final_layernorm(h)
        if targets is not None and loss_chunk > 0:
            logits = None
            lm = chunked_lm_loss(h, self.lm_head.weight, targets, loss_chunk, loss_reduction)
        else:
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep > 0 else h)
            lm = lm_loss(logits, targets, loss_reduction) if targets is not None else None
        out = JambaOutput(logits=logits, lm_loss=lm, router_logits=router_logits if output_router_logits else [],
                          expert_counts=counts)
        if output_router_logits and router_logits:
            out.aux_loss = load_balancing_loss(router_logits, self.cfg.n_experts, self.cfg.top_k, token_mask)
            if self.cfg.router_z_loss_coef > 0:
                out.z_loss = router_z_loss(router_logits)
        if labels is not None:
            out.lm_loss = lm_loss(logits[:, :-1], labels[:, 1:])
        if out.lm_loss is not None:
            out.loss = out.lm_loss
            if out.aux_loss is not None:
                out.loss = out.loss + self.cfg.router_aux_loss_coef * out.aux_loss
            if out.z_loss is not None:
                out.loss = out.loss + self.cfg.router_z_loss_coef * out.z_loss
        return out

    def new_cache(self) -> HybridCache:
        return HybridCache.for_model([layer.kind for layer in self.layers])

    def set_cuda_kernels(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.use_cuda_kernels = enabled
