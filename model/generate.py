"""Generation with the hybrid cache: one prefill over the prompt, then one-token decode steps."""

from __future__ import annotations

import torch

from model.cache import HybridCache
from model.jamba import Jamba


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[b, V] -> [b]: greedy when temperature == 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p      # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Jamba, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int | None = None
             ) -> tuple[torch.Tensor, HybridCache]:
    """prompt [b, L] -> ([b, L + new], cache). Stops early when every row has produced ``eos_id``."""
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = model.new_cache()
    logits = model(prompt, cache=cache, logits_to_keep=1).logits[:, -1]
    tokens = [prompt]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens.append(nxt[:, None])
        if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return torch.cat(tokens, dim=1), cache
