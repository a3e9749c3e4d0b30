"""Optimizers by optim.name, from the OPTIMIZERS registry: sgd, adamw, and muon (Muon on conv filters, Nesterov
SGD on everything else). Add one with @OPTIMIZERS.register("name") on a builder(groups, cfg) -> torch.optim.Optimizer:
groups are the parameter groups to hand to the optimizer as they are, cfg the optim config section."""
from __future__ import annotations

import torch

from .registry import Registry

OPTIMIZERS = Registry("optimizer", "optim.name")


def build_optimizer(cfg, model: torch.nn.Module,
                    expiring: dict[torch.nn.Parameter, int] | None = None) -> torch.optim.Optimizer:
    """The optimizer cfg (the OptimConfig) names, over the model's trainable parameters. expiring: parameters
    trained only until an optimizer step; each gets a group of its own (the hyperparameters of the group it would
    have joined) marked `until_step`, which the LR schedule takes to 0 by that step. Frozen parameters
    (requires_grad false: model.freeze) are left out."""
    return OPTIMIZERS[cfg.name](split_expiring(decay_groups(model, cfg.decay_norm_bias), expiring or {}), cfg)


def decay_groups(model: torch.nn.Module, decay_norm_bias: bool = True) -> list[dict]:
    """The trainable parameters as groups: one group (decay_norm_bias, the default: every recipe's results as
    before), or, with optim.decay_norm_bias=false, the rest and then the norm and bias parameters (every parameter
    of fewer than 2 dimensions, or named *.bias, as timm's param_groups_weight_decay) with weight_decay 0."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if decay_norm_bias:
        return [dict(params=[p for _, p in named])]
    quiet = [p for name, p in named if p.ndim <= 1 or name.endswith(".bias")]
    loud = [p for name, p in named if not (p.ndim <= 1 or name.endswith(".bias"))]
    return [g for g in (dict(params=loud), dict(params=quiet, weight_decay=0.0)) if g["params"]]


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("muon")
def muon(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Each group split three ways: conv filters (Muon), vectors such as biases and norms (bias_lr) and 2-D
    weights such as the classifier (head_lr)."""
    bias_lr, head_lr = cfg.bias_lr or cfg.lr, cfg.head_lr or cfg.lr
    split = []
    for group in groups:
        params, decay = group["params"], group.get("weight_decay", cfg.weight_decay)   # 0: optim.decay_norm_bias
        # weight decay per step is the same for every group whatever its lr: torch multiplies it by the lr
        split += [{**group, "params": [p for p in params if p.ndim == 4], "lr": cfg.lr, "muon": True,
                   "momentum": cfg.muon_momentum, "weight_decay": 0.0},
                  {**group, "params": [p for p in params if p.ndim < 2], "lr": bias_lr,
                   "weight_decay": decay / bias_lr},
                  {**group, "params": [p for p in params if p.ndim == 2], "lr": head_lr,
                   "weight_decay": decay / head_lr}]
    return Muon([g for g in split if g["params"]], lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def split_expiring(groups: list[dict], expiring: dict[torch.nn.Parameter, int]) -> list[dict]:
    """The groups without the expiring parameters, then one group per expiring parameter (so group 0, whose lr is
    the one logged, stays the main one). Empty groups are dropped."""
    until = {id(p): step for p, step in expiring.items()}       # by identity: tensors compare elementwise
    kept, alone = [], []
    for group in groups:
        kept.append({**group, "params": [p for p in group["params"] if id(p) not in until]})
        alone += [{**group, "params": [p], "until_step": until[id(p)]} for p in group["params"] if id(p) in until]
    return [g for g in kept + alone if g["params"]]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g, approximately: a quintic Newton-Schulz iteration whose
    coefficients push every singular value towards 1 fast (they end near, not at, 1, which is enough)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with muon=True: Nesterov momentum, orthogonalised per filter bank (out x in*k*k), applied to weights
    kept at a fixed norm, so the lr is a relative step. Other groups: plain SGD with (Nesterov) momentum and
    coupled weight decay. One optimizer, so the engine, the LR schedule and checkpoints treat it like any other."""

    def __init__(self, groups, lr: float, momentum: float, nesterov: bool = True):
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and not group["muon"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(g)
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["muon"]:
                    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
                    p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-lr)
                else:
                    p.add_(g, alpha=-lr)
        return loss
