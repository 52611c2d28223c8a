"""Reinforcement learning for masked diffusion models through TRL (extra `hf_mdm[rl]`).

estimators.py (the completion log-probability estimators: `diffu_grpo`, `coupled`, `elbo`; torch only) and
trainer.py (`MDMGRPOTrainer`, TRL's GRPOTrainer with diffusion rollouts, and `MDMGRPOConfig`). The trainer loads TRL
on first use, so the estimators work without it. Guide: docs/rl.md.
"""

from .estimators import (ESTIMATORS, CoupledEstimator, DiffuGRPOEstimator, ELBOEstimator, LogProbEstimator,
                         build_estimator, completion_logps)


def __getattr__(name: str):
    if name in ("MDMGRPOConfig", "MDMGRPOTrainer"):
        try:
            from . import trainer
        except ImportError as error:
            if error.name == "trl":
                raise ImportError("hf_mdm.rl's trainer needs TRL: pip install 'hf_mdm[rl]'.") from None
            raise
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ESTIMATORS", "CoupledEstimator", "DiffuGRPOEstimator", "ELBOEstimator", "LogProbEstimator",
           "MDMGRPOConfig", "MDMGRPOTrainer", "build_estimator", "completion_logps"]
