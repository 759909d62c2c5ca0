"""The router load-balancing loss of mixture-of-experts models (Mixtral), for any batch layout we train on.

transformers adds it only when the model is called with labels and a 2-D attention mask; packed rows carry a 4-D
block-diagonal mask and our loss is computed outside the model. So the routers' logits are captured by forward
hooks during the ordinary forward pass, and the loss (Switch Transformer's, as transformers computes it) is taken
over real tokens only, times the config's `router_aux_loss_coef`.
"""

from __future__ import annotations


def _is_router(module) -> bool:
    """A top-k router as transformers 5 writes them: returns (router_logits, scores, indices)."""
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "top_k") and hasattr(module, "num_experts")


class RouterLoss:
    """Collects router logits during a forward pass; `pop(token_mask)` returns coef x load-balancing loss."""

    def __init__(self, model, coef: float):
        self.coef = coef
        self.routers = [m for m in model.modules() if _is_router(m)]
        self.num_experts = self.routers[0].num_experts
        self.top_k = self.routers[0].top_k
        self._logits: list = []
        self._handles = [router.register_forward_hook(self._capture) for router in self.routers]

    def _capture(self, module, args, output) -> None:
        if module.training:  # evaluation and generation leave no logits behind
            self._logits.append(output[0] if isinstance(output, tuple) else output)

    def discard(self) -> None:
        """Forget what was captured since the last pop: with activation checkpointing, backward recomputes each
        layer's forward, routers included, and those logits (of a finished graph) must not join the next loss."""
        self._logits = []

    def pop(self, token_mask=None):
        """coef x the loss for the forward pass just run (0 if it captured nothing), and forget its logits."""
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        logits, self._logits = tuple(self._logits), []
        if not logits:
            return 0.0
        return self.coef * load_balancing_loss_func(logits, self.num_experts, self.top_k, token_mask)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def build_router_loss(model) -> RouterLoss | None:
    """A RouterLoss for an MoE model whose config asks for one (router_aux_loss_coef > 0), else None."""
    config = getattr(model, "config", None)
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if coef <= 0 or not any(_is_router(m) for m in model.modules()):
        return None
    return RouterLoss(model, coef)
