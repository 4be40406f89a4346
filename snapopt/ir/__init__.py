"""Block-level IR derived from a torch.export capture."""

from snapopt.ir.block_graph import BlockGraph, build_block_graph
from snapopt.ir.ops import OpRecord

__all__ = ["BlockGraph", "OpRecord", "build_block_graph"]
