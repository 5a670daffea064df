"""Routers over the weak-encoder pool, top-k selection and the load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class DataIndependentRouter(nn.Module):
    """q = softmax(theta): one learned distribution over the pool, the same top-k for every input (in eval)."""

    def __init__(self, num_weak_encoders: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_weak_encoders))

    def forward(self, batch_size: int) -> torch.Tensor:
        """Router logits [batch_size, num_weak_encoders] (one row repeated)."""
        return self.logits[None, :].expand(batch_size, -1)


class DataDependentRouter(nn.Module):
    """p(x) = softmax(W . masked_mean_t(H_b) + b): a distribution per clip from its base features."""

    def __init__(self, base_hidden_size: int, num_weak_encoders: int):
        super().__init__()
        self.classifier = nn.Linear(base_hidden_size, num_weak_encoders)

    def forward(self, base_hidden: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """Router logits [b, num_weak_encoders] from base features [b, T, d_b] with `valid_frames` [b] real frames."""
        mask = torch.arange(base_hidden.shape[1], device=base_hidden.device)[None, :] < valid_frames[:, None]
        mask = mask[..., None].to(base_hidden.dtype)
        pooled = (base_hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(pooled.to(self.classifier.weight.dtype))


class RoutingDecision(NamedTuple):
    """One router's top-k decision for a batch of windows (unpacks as `(probs, index, gates)`).

    probs (`torch.FloatTensor` of shape `(num_windows, num_weak_encoders)`): the router's softmax, in fp32.
    index (`torch.LongTensor` of shape `(num_windows, top_k)`): the selected weak encoders (best first in eval).
    gates (`torch.FloatTensor` of shape `(num_windows, top_k)`): their probabilities, which weight their features.
    """

    probs: torch.Tensor
    index: torch.Tensor
    gates: torch.Tensor


def top_k_gates(router_logits: torch.Tensor, top_k: int, sample: bool = False) -> RoutingDecision:
    """Softmax over the pool and the k weak encoders it selects.

    Returns the `RoutingDecision`: `probs` [b, E], the selected weak encoders `index` [b, k] and their `gates` [b, k]
    (the router probabilities, not renormalised, so the gates stay differentiable with respect to every logit).

    `sample=False` (eval) takes the k most probable, deterministically (`torch.topk`; which of equal logits wins is
    up to the kernel, not always the lower index). `sample=True` (training) draws k without replacement from `probs`
    (Gumbel top-k: the top-k of log-probabilities + Gumbel noise), so every weak encoder keeps being tried in
    proportion to its probability. Without it a router whose logits start equal picks one tie winner for every clip,
    trains only that encoder and reinforces its own choice.
    """
    probs = router_logits.float().softmax(dim=-1)
    scores = probs.log()
    if sample:
        scores = scores - torch.empty_like(scores).exponential_().log()  # + Gumbel(0, 1)
    index = scores.topk(top_k, dim=-1).indices
    return RoutingDecision(probs, index, probs.gather(-1, index))


def routing_entropy(router_logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each window's router distribution, [..., E] -> [...]: log(E) when uniform, 0 when sure."""
    log_probs = router_logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def load_balancing_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss L = N * sum_i f_i * P_i.

    f_i: fraction of the routed slots (b * k) that went to weak encoder i; P_i: mean of p_i over the batch.
    Equals 1 when routing is perfectly balanced; grows to N when one weak encoder takes everything.
    """
    num_weak_encoders = probs.shape[-1]
    counts = torch.zeros(num_weak_encoders, device=probs.device, dtype=probs.dtype)
    counts = counts.index_add(0, index.reshape(-1), torch.ones_like(index.reshape(-1), dtype=probs.dtype))
    fraction = counts / index.numel()
    return num_weak_encoders * (fraction * probs.mean(0)).sum()
