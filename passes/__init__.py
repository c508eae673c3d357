"""Built-in passes, one module each. Importing this package registers them.

Users write their own passes against the same contract:

    from slimc.passes import Context, Pass, register_pass
"""

from slimc.pass_base import Context, Pass, register_pass
from slimc.passes import calibrate, fake_quant, lower, norm_fusion, rotate, rotate_inputs, smooth

__all__ = ["Context", "Pass", "register_pass", "calibrate", "fake_quant", "lower", "norm_fusion", "rotate", "rotate_inputs", "smooth"]
