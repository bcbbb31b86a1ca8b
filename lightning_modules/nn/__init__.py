"""Plain ``torch.nn`` building blocks, no Lightning."""

from lightning_modules.nn.distributed import gather_with_grad
from lightning_modules.nn.mlp import mlp
from lightning_modules.nn.variance_constraints import variance_constraint_losses

__all__ = ["gather_with_grad", "mlp", "variance_constraint_losses"]
