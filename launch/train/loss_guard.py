"""What to do with a non-finite or spiking loss, decided after forward and before backward.

Every micro-batch's loss is summed over ranks together with a "not finite here" count, in
one all-reduce, so every rank sees the same global loss and takes the same decision. A
micro-batch is bad when any rank's loss is not finite, or (``train.spike_factor`` > 0) the
global loss exceeds ``spike_factor`` × the running mean of good steps' losses.

A bad micro-batch backpropagates a zero instead of its loss (:func:`skip_loss`), so
DeepSpeed's micro-step and accumulation bookkeeping stays as usual and the gradients it
contributes are exactly zero. The optimizer still steps: AdamW's moments
decay and weight decay applies on a skipped step, but no gradient from the bad batch
reaches the weights. ``train.bad_loss_policy``: ``stop`` raises :class:`BadLossError` at
the ``train.max_bad_steps``-th bad step in a row (earlier ones are skipped); ``skip`` skips
bad steps and never stops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmforge.launch.config import TrainConfig
from lmforge.launch.train.collectives import all_reduce

# Weight of the newest good step in the running mean the spike test compares against.
EMA_WEIGHT = 0.1


class BadLossError(RuntimeError):
    """Training stopped on a non-finite or spiking loss (``train.bad_loss_policy=stop``)."""


class LossGuard:
    """Detects bad losses collectively and counts bad steps; see the module docstring."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")  # the engine's: where the check reduces
        self.policy = cfg.bad_loss_policy
        self.max_bad_steps = cfg.max_bad_steps
        self.spike_factor = cfg.spike_factor
        self.running_mean: float | None = None
        self.in_a_row = 0  # bad steps in a row, up to the last finished step
        self.bad_steps = 0  # bad steps in the whole run
        self._step_bad = False
        self._step_losses: list[float] = []

    def check(self, loss: Tensor, step: int) -> bool:
        """True when this micro-batch's loss is bad on any rank (a collective call).

        Raises:
            BadLossError: Policy ``stop`` and this makes ``max_bad_steps`` bad steps in a row.
        """
        local = loss.detach().double().reshape(1).to(self.device)
        finite = torch.isfinite(local)
        # One reduction of (not-finite count, loss sum); the decision needs it on the host.
        both = torch.cat([(~finite).double(), torch.where(finite, local, 0.0)])
        nonfinite, total = all_reduce(both, self.device).tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        nonfinite, mean = int(nonfinite), total / world
        spiked = (self.spike_factor > 0 and self.running_mean is not None
                  and mean > self.spike_factor * self.running_mean)
        bad = bool(nonfinite) or spiked
        if not bad:
            self._step_losses.append(mean)
            return False
        self._step_bad = True
        if self.policy == "stop" and self.in_a_row + 1 >= self.max_bad_steps:
            what = (f"is not finite on {nonfinite} rank(s)" if nonfinite else
                    f"{mean:.6g} is above train.spike_factor {self.spike_factor} x the running "
                    f"mean {self.running_mean:.6g}")
            raise BadLossError(
                f"step {step}: the training loss {what} ({self.in_a_row + 1} bad step(s) in a "
                f"row, train.max_bad_steps={self.max_bad_steps}); try a lower train.lr, "
                "gradient clipping (train.grad_clip=1.0), train.precision=fp32 instead of bf16, "
                "or train.bad_loss_policy=skip; resume from the last checkpoint with --resume auto"
            )
        return True

    def end_step(self) -> bool:
        """Closes the step's books; returns whether the step was bad."""
        bad = self._step_bad
        if bad:
            self.in_a_row += 1
            self.bad_steps += 1
        else:
            self.in_a_row = 0
            step_mean = sum(self._step_losses) / len(self._step_losses)
            self.running_mean = step_mean if self.running_mean is None else (
                (1 - EMA_WEIGHT) * self.running_mean + EMA_WEIGHT * step_mean)
        self._step_bad, self._step_losses = False, []
        return bad

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "in_a_row": self.in_a_row,
                "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = state["running_mean"]
        self.in_a_row = state["in_a_row"]
        self.bad_steps = state["bad_steps"]


def skip_loss(loss: Tensor, model: nn.Module, zero_stage: int) -> Tensor:
    """What a bad micro-batch backpropagates in place of ``loss``: gradients of exactly 0.

    A finite (spiking) loss times 0 gives zero gradients through the finite graph, at every
    ZeRO stage. A non-finite loss cannot (0 x NaN is NaN), so up to ZeRO-2 the zero comes
    from the parameters (:func:`zero_loss`). Under ZeRO-3 the parameters are partitioned
    outside forward and cannot be used that way; the NaN gradients then make DeepSpeed's
    overflow check skip the optimizer step ("OVERFLOW! Skipping step").
    """
    if bool(torch.isfinite(loss.detach())) or zero_stage >= 3:
        return loss * 0.0
    return zero_loss(model)


def zero_loss(model: nn.Module) -> Tensor:
    """A scalar 0 whose gradient is exactly 0 for every trainable parameter.

    It is built from the parameters, not from the bad batch's activations: backward through
    NaN activations would give NaN gradients even for a loss multiplied by zero, while
    ``d(p * 0)/dp`` is 0 whatever ``p`` holds (``nan_to_num`` keeps the value finite too).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([(p * 0.0).nan_to_num().sum() for p in params]).sum()
