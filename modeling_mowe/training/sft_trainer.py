"""`MoWESFTTrainer`: TRL's `SFTTrainer` whose training loss holds MoWE's balancing loss.

Tooling wing (imports TRL at module level; `training.make_sft_trainer` imports this module when it builds a trainer).
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


class MoWESFTTrainer(SFTTrainer):
    """`SFTTrainer` that adds `router_aux_loss_coef * router_aux_loss` (the data-dependent router's balancing loss) to
    the loss it trains on.

    SFTTrainer computes the LM loss itself, from the backbone's hidden states through its fused LM head, so the
    model's own `loss` (which holds the balancing term) is never used. This adds the term the way SFTTrainer adds a
    Mixture-of-Experts LLM's auxiliary loss: per micro-batch, divided by the gradient-accumulation steps when the LM
    loss is normalised over the whole accumulated batch (`num_items_in_batch`). Both terms are then one loss, so
    whatever the Trainer scales it by (accumulation, fp16 loss scaling, data-parallel averaging) scales them alike.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tower = self.accelerator.unwrap_model(model).get_encoder(modality="audio")
        captured: list[torch.Tensor] = []
        handle = None
        if tower.routers:
            # The first forward of a `compute_loss` is the one its loss comes from (later ones only feed metrics).
            handle = tower.register_forward_hook(lambda module, args, output: captured.append(output.router_aux_loss))
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            if handle is not None:
                handle.remove()
        coef = tower.config.router_aux_loss_coef
        if not captured or captured[0] is None or coef == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + coef * captured[0].to(loss.device, loss.dtype) / steps
        return (loss, outputs) if return_outputs else loss
