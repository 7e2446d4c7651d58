"""Merge methods: importing this package registers every method in ``REGISTRY``."""

from merging.methods import linear, slerp, task_arithmetic  # noqa: F401  (registration)
from merging.methods import data_aware  # noqa: F401, I001  (listed after the weight-only methods)
from merging.methods.spec import REGISTRY, REQUIRED, MergeMethod, MethodSpec, Param, get_method

__all__ = ["REGISTRY", "REQUIRED", "MergeMethod", "MethodSpec", "Param", "get_method"]
