"""The losses' value checks: :class:`gspo_kernels._validate.ValueChecks` (one device flag, read once)."""
from .._validate import ValueChecks

__all__ = ["ValueChecks"]
