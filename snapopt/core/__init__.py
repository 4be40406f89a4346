"""Pass infrastructure: pass base class, registry (plugins), manager and verification."""

from snapopt.core.pass_base import ComponentOptions, Pass, PassContext, PassOptions, PassResult
from snapopt.core.pass_manager import PassManager, PassRecord
from snapopt.core.registry import PASSES, PassRegistry

__all__ = ["ComponentOptions", "PASSES", "Pass", "PassContext", "PassManager", "PassOptions", "PassRecord",
           "PassRegistry", "PassResult"]
