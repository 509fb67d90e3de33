"""The learning-rate schedule: Megatron's `OptimizerParamScheduler`, counted in optimizer steps (slime's iterations).

Megatron's formula, with n the optimizer steps already taken (the scheduler steps once after each):
    warmup, n <= W:   lr = n / W * lr_max                     (from 0: the first step of a warmup runs at lr 0)
    constant:         lr = lr_max
    after D (n > D):  lr = lr_min
    else, r = (n - W) / (D - W):  linear: lr_min + (1 - r) * (lr_max - lr_min)
                                  cosine: lr_min + (cos(pi * r) + 1) / 2 * (lr_max - lr_min)
W = --lr-warmup-iters, D = --lr-decay-iters (default: the run's optimizer steps), lr_max = --lr, lr_min = --min-lr.
Weight decay stays --weight-decay, which the scheduler applies per parameter group (Megatron's groups exempt norms
and biases).
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(optimizer, o, lr_decay_iters: int) -> OptimizerParamScheduler:
    """`o`: the run's OptimizerConfig. On resume, the checkpoint gives the step count; the schedule is this run's
    flags (override), so a longer --num-rollout stretches the default decay."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.lr_warmup_iters,
        lr_decay_steps=lr_decay_iters, lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=lr_decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
