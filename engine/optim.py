"""Optimisation: LARS (solo-learn's CIFAR configuration), its parameter groups, the learning-rate schedule."""

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), configured as solo-learn's CIFAR runs.

    For each parameter w of a group with lars=True: trust = eta * |w| / (|grad| + wd * |w|),
    clipped (clip=True) so that the step never exceeds plain SGD's: d = (grad + wd * w) * min(trust / lr, 1);
    where |w| or |grad| is 0, d = grad.
    Groups with lars=False (biases, BatchNorm, the probe) take plain SGD steps, d = grad.
    Then buf = momentum * buf + d and w <- w - lr * buf.
    """

    def __init__(self, params, *, lr, eta, weight_decay=0.0, momentum=0.9, clip=True):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, lars=True)
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                wd, lr = group["weight_decay"], group["lr"]
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
                if group["clip"]:
                    trust = (trust / lr).clamp(max=1.0)
                # solo-learn: no trust ratio and no decay where a norm is 0, d = grad (0 for a zero gradient)
                trust = torch.where(w_norm > 0, trust, torch.ones_like(trust))
                trust = torch.where(g_norm > 0, trust, torch.zeros_like(trust))
                updates = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(updates, list(trust.unbind(0)))
            else:
                updates = grads
            buffers = []
            for p, d in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def param_groups(modules, weight_decay):
    """LARS's two groups: weights (decayed, LARS-scaled) and 1-D parameters -- biases and BatchNorm
    (no weight decay and no trust ratio: solo-learn's exclude_bias_n_norm)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
    ]


def learning_rate_factor(step, total_steps, warmup_steps):
    """Linear warm-up to 1 over warmup_steps, then cosine decay to 0, per step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def learning_rate_schedule(total_steps, warmup_steps):
    """The learning-rate factor of every step of the run, in order: learning_rate_factor(0), ..., (total - 1)."""
    return [learning_rate_factor(step, total_steps, warmup_steps) for step in range(total_steps)]


def set_learning_rate(optimizer, factor):
    """Every group's lr = its base_lr (default: the group's initial lr) x the schedule's factor."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        if not group.get("fixed_lr", False):  # SimSiam's predictor keeps its lr
            group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
