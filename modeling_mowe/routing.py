"""Routers over the weak-encoder pool, top-k selection and the load-balancing loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class DataIndependentRouter(nn.Module):
    """q = softmax(theta): one learned distribution over the pool, the same top-k for every input."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_experts))

    def forward(self, batch_size: int) -> torch.Tensor:
        """Router logits [batch_size, num_experts] (one row repeated)."""
        return self.logits[None, :].expand(batch_size, -1)


class DataDependentRouter(nn.Module):
    """p(x) = softmax(W . masked_mean_t(H_b) + b): a distribution per clip from its base features."""

    def __init__(self, base_hidden_size: int, num_experts: int):
        super().__init__()
        self.classifier = nn.Linear(base_hidden_size, num_experts)

    def forward(self, base_hidden: torch.Tensor, valid_frames: torch.Tensor) -> torch.Tensor:
        """Router logits [b, num_experts] from base features [b, T, d_b] with `valid_frames` [b] real frames."""
        mask = torch.arange(base_hidden.shape[1], device=base_hidden.device)[None, :] < valid_frames[:, None]
        mask = mask[..., None].to(base_hidden.dtype)
        pooled = (base_hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(pooled.to(self.classifier.weight.dtype))


class RoutingDecision(NamedTuple):
    """One router's top-k decision for a batch of windows (unpacks as `(probs, index, gates)`).

    probs (`torch.FloatTensor` of shape `(num_windows, num_weak_encoders)`): the router's softmax, in fp32.
    index (`torch.LongTensor` of shape `(num_windows, top_k)`): the selected weak encoders, best first.
    gates (`torch.FloatTensor` of shape `(num_windows, top_k)`): their probabilities, which weight their features.
    """

    probs: torch.Tensor
    index: torch.Tensor
    gates: torch.Tensor


def top_k_gates(router_logits: torch.Tensor, top_k: int) -> RoutingDecision:
    """Softmax over the pool and its top-k.

    Returns the `RoutingDecision`: `probs` [b, E], the selected weak encoders `index` [b, k] and their `gates` [b, k]
    (the router probabilities, not renormalised, so the gates stay differentiable with respect to every logit).
    Deterministic: `torch.topk` breaks ties by the lower index.
    """
    probs = router_logits.float().softmax(dim=-1)
    gates, index = probs.topk(top_k, dim=-1)
    return RoutingDecision(probs, index, gates)


def load_balancing_loss(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss L = N * sum_i f_i * P_i.

    f_i: fraction of the routed slots (b * k) that went to expert i; P_i: mean of p_i over the batch.
    Equals 1 when routing is perfectly balanced; grows to N when one expert takes everything.
    """
    num_experts = probs.shape[-1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts = counts.index_add(0, index.reshape(-1), torch.ones_like(index.reshape(-1), dtype=probs.dtype))
    fraction = counts / index.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `hidden` whose backward also feeds d(aux_loss)/d(aux_loss) = 1 into `aux_loss`.

    The audio embeddings pass through this on their way into the LLM, so the balancing loss reaches the routers
    whenever any loss computed from the LLM's outputs is back-propagated: the model's own loss, TRL's fused LM head
    (which never calls our `forward`'s loss), or a user's loop on the logits. Autograd runs a node's backward once
    per backward pass, so the gradient arrives exactly once; `aux_loss` must already carry its coefficient.
    (The technique of DeepSeek-MoE's `AddAuxiliaryLoss`.)
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype = aux_loss.dtype
        ctx.aux_requires_grad = aux_loss.requires_grad
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_aux = None
        if ctx.aux_requires_grad:
            grad_aux = torch.ones((), dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, grad_aux
