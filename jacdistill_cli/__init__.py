"""jacdistill: knowledge distillation with Jacobian matching, as a Hydra experiment runner."""

__version__ = "0.1.0"
