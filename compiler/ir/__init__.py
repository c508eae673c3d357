"""The IR: the model cut into blocks with traced fx graphs (program), how it is traced (tracer, traced_block),
how a stage's inputs are captured (capture), the checkpoint it comes from (source), and what a block call
takes and returns (calls).

The names a pass works with are re-exported here: `from slimc.ir import Block, Program`.
"""

from slimc.ir.program import Block, Program, QuantSpec, Stage, call_with_kwargs

__all__ = ["Block", "Program", "QuantSpec", "Stage", "call_with_kwargs"]
