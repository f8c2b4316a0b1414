"""Optimizer (from the ``optim`` group's ``_target_``) and the per-step learning-rate schedules."""

from __future__ import annotations

import math
import warnings
from typing import Any

from hydra.utils import instantiate
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

SCALING_KEYS = ("lr_scaling", "reference_batch_size")


def scaled_lr(cfg: dict[str, Any], effective_batch_size: int) -> float:
    """``optim.lr`` after the ``optim.lr_scaling`` rule for this effective batch size."""
    ratio = effective_batch_size / cfg["reference_batch_size"]
    return cfg["lr"] * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg["lr_scaling"]]


def build_optimizer(net: nn.Module, cfg: dict[str, Any]) -> Optimizer:
    """Instantiate the partial optimizer; weight decay only on conv/linear weights, not norms or biases."""
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {k: v for k, v in cfg.items() if k not in SCALING_KEYS}
    return instantiate(kwargs, _convert_="all")(groups)


def build_scheduler(optimizer: Optimizer, cfg: dict[str, Any], total_steps: int) -> LRScheduler | None:
    """The ``sched`` group's schedule over ``total_steps`` optimizer steps, or None for a constant lr."""
    name = cfg["name"]
    if name == "none":
        return None
    if name == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=cfg["pct_start"],
            div_factor=cfg["div_factor"],
            final_div_factor=cfg["final_div_factor"],
        )
    warmup = int(total_steps * cfg["warmup_fraction"])
    eta_min = optimizer.defaults["lr"] * cfg["min_lr_ratio"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=eta_min)
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=cfg["warmup_start_factor"], total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def replan(
    optimizer: Optimizer,
    net: nn.Module,
    optim: dict[str, Any],
    sched: dict[str, Any],
    total_steps: int,
    step: int,
) -> LRScheduler | None:
    """The ``sched`` schedule over ``total_steps``, at ``step``, after ``optimizer``'s settings are made
    ``optim``'s: for a run resumed with another optimizer or schedule than its checkpoint's (another
    ``optim``; another length, a raised ``trainer.max_epochs`` or ``max_steps``; another ``sched``).

    A schedule's state holds its plan (OneCycleLR stops with an error past its ``total_steps``; a cosine
    rises again past ``T_max``), and a restored optimizer its saved settings (a new ``optim.lr`` would go
    unused), so the settings and the plan come from the config and only the position and the optimizer's
    state (momentum buffers, Adam's moments) from the checkpoint, as timm resumes its schedulers. Each
    param group's settings are then those of a run configured so from the start.
    """
    fresh = build_optimizer(net, optim)  # builds no state: only its param groups' settings are taken
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        params = group["params"]
        group.clear()  # a former schedule's keys (OneCycleLR's max_lr, ...) go too
        group.update({**new, "params": params})
    optimizer.defaults = fresh.defaults
    scheduler = build_scheduler(optimizer, sched, total_steps)
    if scheduler is not None:
        with warnings.catch_warnings():  # stepped ahead without optimizer steps, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            for _ in range(step):
                scheduler.step()
    return scheduler


def configure_optimizers(
    net: nn.Module, optim: dict[str, Any], sched: dict[str, Any], total_steps: float
) -> Any:
    """What ``configure_optimizers`` of a module training ``net`` returns: the optimizer, and the schedule
    over the run's ``total_steps`` optimizer steps (the Trainer's estimate), stepped every step."""
    optimizer = build_optimizer(net, optim)
    scheduler = build_scheduler(optimizer, sched, int(total_steps))
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
