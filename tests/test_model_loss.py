"""The chunked LM loss equals the full one in value and gradients, and holds fewer logits at once."""

from __future__ import annotations

import pytest
import torch

from model import Jamba, JambaConfig
from model.loss import IGNORE, chunked_lm_loss, lm_loss
from tests.test_model import tiny


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_equals_full_loss_and_gradients(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(500, 32, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 500, (3, 40))
    targets[0, :5] = IGNORE
    full = lm_loss(hidden @ weight.T, targets)
    g_full = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_lm_loss(hidden, weight, targets, chunk)
    g_chunk = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(full.double(), chunked.double(), rtol=1e-6, atol=0)
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def test_model_with_loss_chunk_matches_and_returns_no_logits():
    torch.manual_seed(0)
    cfg: JambaConfig = tiny()
    model = Jamba(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    targets = ids[:, 1:].clone()
    full = model(ids[:, :-1], targets=targets)
    chunked = model(ids[:, :-1], targets=targets, loss_chunk=16)
    assert full.logits is not None and chunked.logits is None
    assert torch.allclose(full.lm_loss, chunked.lm_loss, rtol=1e-5)
    assert torch.allclose(full.lm_loss, model(ids, labels=ids).lm_loss, rtol=1e-5)  # labels shift the same way


def test_chunked_loss_keeps_only_a_chunk_of_logits_for_backward():
    hidden = torch.randn(1, 256, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (1, 256))

    def saved(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    biggest_full = saved(lambda: lm_loss(hidden @ weight.T, targets))
    biggest_chunked = saved(lambda: chunked_lm_loss(hidden, weight, targets, 32))
    assert biggest_full >= 256 * 1000 and biggest_chunked < 256 * 1000 // 4
