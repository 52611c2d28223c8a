"""Exponential moving average of the weights (MDLM evaluates and releases its EMA weights, decay 0.9999)."""

from contextlib import contextmanager

import torch


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights, after every optimizer step; kept in float32.

    Registered with `accelerator.register_for_checkpointing`, so it is saved and restored with the run.
    """

    def __init__(self, parameters, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in parameters], 1.0 - self.decay)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, parameters):
        """Within the block the model holds the EMA weights; its own weights come back afterwards."""
        parameters = list(parameters)
        backup = [p.detach().clone() for p in parameters]
        for p, s in zip(parameters, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(parameters, backup):
                p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
