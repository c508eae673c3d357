"""A pass that records the hidden states each block is calibrated on (tests/test_propagate.py)."""

from __future__ import annotations

from pydantic import PrivateAttr

from slimc.ir.calls import hidden_of
from slimc.passes import Pass


class RecordInputs(Pass):
    """Keeps a copy of every calibration batch's hidden states, per block, in `hidden[block name]`; changes nothing."""

    preserves_function = True
    _hidden: dict = PrivateAttr(default_factory=dict)

    @property
    def hidden(self) -> dict:
        return self._hidden

    def run_block(self, block, ctx) -> None:
        self._hidden[block.name] = [hidden_of(batch).clone() for batch in ctx.inputs]
