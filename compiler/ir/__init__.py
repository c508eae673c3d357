"""The IR: the model cut into blocks with traced fx graphs (program), how it is traced (tracer, traced_block),
how a stage's inputs are captured (capture), the checkpoint it comes from (source), what a block call
takes and returns (calls), and forward hooks removed when their `with` block exits (hooks).

The names a pass works with are re-exported here: `from slimc.ir import Block, Program`.
"""

from slimc.ir.program import Block, Program, QuantSpec, Rotations, Stage, call_with_kwargs

__all__ = ["Block", "Program", "QuantSpec", "Rotations", "Stage", "call_with_kwargs"]
