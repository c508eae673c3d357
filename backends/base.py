"""The backend contract: what every output format provides, and the registry of formats by name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from slimc.ir.source import write_model_files

if TYPE_CHECKING:
    from slimc.ir import Program
    from slimc.schemes import KVCacheScheme, ShapeRule

BACKENDS: dict[str, type[Backend]] = {}


class Backend(BaseModel):
    """Base class of output formats; subclasses add their options as typed fields."""

    model_config = ConfigDict(extra="forbid")
    format_name: ClassVar[str] = ""
    extra: ClassVar[str | None] = None  # the slimc extra installing the libraries the format needs (`slimc[onnx]`)
    # The weight shapes the format's layouts can hold, beyond what the schemes need (`slimc.schemes.SHAPE_RULES`);
    # `compile` checks them on the plan before calibrating.
    shape_rules: ClassVar[tuple[ShapeRule, ...]] = ()

    def export(self, program: Program, out_dir: Path) -> list[Path]:
        """Write the program in this format into the (existing, empty) directory: the model's own files that the
        runtimes read beside the weights (config.json with the program's config updates, tokenizer, ...), then
        the format's files. Return every written file."""
        out_dir = Path(out_dir)
        self.check(program)
        copied = write_model_files(program.source, out_dir, program.config_updates)
        return sorted(set(copied) | set(self.write(program, out_dir)))

    def check(self, program: Program) -> None:
        """Raise ExportError if the format cannot hold this program; `export` asks before writing anything."""
        from slimc.backends.checkpoint import kv_cache_quantizers, qk_rotations
        from slimc.errors import ExportError

        for _, quantizer in kv_cache_quantizers(program)[:1]:
            refusal = self.kv_cache_refusal(quantizer.kv_scheme)
            if refusal:
                raise ExportError(f"{self.format_name}: the program quantizes the KV cache to {quantizer.kv_scheme.dtype} "
                                  f"(fake_quant's kv_cache), which this format cannot hold: {refusal}")
        refusal = self.qk_rotation_refusal() if qk_rotations(program) else None
        if refusal:
            raise ExportError(f"{self.format_name}: the program rotates the attention's queries and keys online "
                              f"(rotate's online_qk), which this format cannot hold: {refusal}")

    def qk_rotation_refusal(self) -> str | None:
        """Why the format cannot hold an online Hadamard on the attention's queries and keys after RoPE (rotate's
        `online_qk`, for a quantized KV cache); None where it can."""
        return "it has no quantized KV cache"

    def kv_cache_refusal(self, scheme: KVCacheScheme) -> str | None:
        """Why the format cannot hold a KV cache quantized by `scheme` (fake_quant's `kv_cache`); None where it can."""
        return "it has no quantized KV cache"

    def write(self, program: Program, out_dir: Path) -> list[Path]:
        """The format's own files (weights, quantization description), written into `out_dir` after the model's
        files (`export`), which a format may update (vllm adds its quantization_config to config.json)."""
        raise NotImplementedError

    def verify(self, program: Program, out_dir: Path) -> None:
        """Read the written files back with the format's own reader; raise ExportError on a mismatch."""
        raise NotImplementedError


def register_backend(name: str):
    def decorate(cls: type[Backend]) -> type[Backend]:
        cls.format_name = name
        BACKENDS[name] = cls
        return cls

    return decorate
