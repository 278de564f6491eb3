"""Next-token cross-entropy through the LM head, optionally in token chunks that never hold all logits.

At long context the logits dominate training memory (65,536 vocabulary x 4 bytes x tokens, plus their
fp32 copy, log-softmax and gradient). ``chunked_lm_loss`` computes the head and the loss ``chunk`` tokens
at a time and recomputes each chunk's logits in backward, so only ``chunk x vocab`` logits live at once;
the value and gradients equal the unchunked loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [..., V] against targets [...] (IGNORE positions excluded): the mean, or with
    ``reduction="sum"`` the sum (0 when every target is ignored, where the mean is undefined)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                    reduction: str = "mean") -> torch.Tensor:
    """The same value as ``lm_loss(hidden @ weight.T, targets, reduction)``, ``chunk`` tokens of logits at a
    time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    count = (targets != IGNORE).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, targets[start:start + chunk])
        total = total + (checkpoint(_chunk_loss_sum, *args, use_reentrant=False) if grad else _chunk_loss_sum(*args))
    return total if reduction == "sum" else total / count.clamp_min(1)
