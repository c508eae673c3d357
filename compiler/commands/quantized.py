"""The models a `slimc compile` output computes, read back from each format's own files for `slimc eval`.

- `mindie`: slimc's reader of the Ascend files (backends/mindie_reader.py) rebuilds what MindIE and vLLM-Ascend run.
- `vllm`: transformers loads the compressed-tensors checkpoint (the `compressed-tensors` library decompresses it,
  on the CPU too) and simulates vLLM's kernels: integer weights dequantized, activations quantized and dequantized
  as the scheme says. Its dynamic per-token int8 scales are amax / 127.5 where vLLM's kernel divides by 127, so a
  W8A8_DYNAMIC perplexity can differ from vLLM's in the last digits.
- `onnx`: onnxruntime runs the graph (backends/onnx.py's session, computing as the program does), wrapped as a
  module that takes `input_ids` and returns `logits`: decoder LLM graphs that return every position's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from slimc.commands.compile import model_dtype
from slimc.config import SlimcConfig
from slimc.environment import require_extra
from slimc.errors import DataError

FORMATS = ("mindie", "vllm", "onnx")  # the formats slimc eval reads, in the order it evaluates them
MARKERS = {"mindie": "quant_model_description.json", "vllm": "config.json", "onnx": "onnx_model.json"}


def written_formats(path: Path) -> dict[str, Path]:
    """The formats in a compile output and their directories: OUT/<format> for each format written, or OUT itself
    where it is one format's directory (its files, or one subdirectory of them per exported part)."""
    path = Path(path)
    found = {name: path / name for name in FORMATS if holds(name, path / name)}
    if not found:
        found = {name: path for name in FORMATS if holds(name, path)}
    if not found:
        raise DataError(f"{path} holds no compile output (mindie's {MARKERS['mindie']}, vllm's config.json with a "
                        f"compressed-tensors quantization_config, onnx's {MARKERS['onnx']}); pass the --out directory "
                        "of `slimc compile`")
    return found


def holds(name: str, directory: Path) -> bool:
    """Whether `directory` holds format `name`'s files, or one subdirectory of them per part."""
    return directory.is_dir() and any(_is_written(name, d) for d in (directory, *directory.glob("*/")))


def holds_files(name: str, directory: Path) -> bool:
    """Whether `directory` holds format `name`'s files themselves (not one subdirectory of them per part)."""
    return _is_written(name, directory)


def _is_written(name: str, directory: Path) -> bool:
    marker = directory / MARKERS[name]
    if name != "vllm" or not marker.is_file():
        return marker.is_file()
    try:
        return json.loads(marker.read_text()).get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    except (OSError, ValueError, AttributeError):
        return False


def load_quantized_model(name: str, directory: Path, config: SlimcConfig) -> nn.Module:
    """The model format `name`'s files in `directory` compute. An output written in parts (one subdirectory per
    model of the program, named as the program's model names its child: Wan2.2's `transformer/`, `transformer_2/`)
    gives a container holding each part's model under that name, so block names and `program.call` apply to it."""
    if _is_written(name, directory):
        return READERS[name](directory, config)
    container = nn.Module()
    for part in sorted(d for d in directory.iterdir() if _is_written(name, d)):
        container.add_module(part.name, READERS[name](part, config))
    return container.eval()


def _mindie(directory: Path, config: SlimcConfig) -> nn.Module:
    from slimc.backends.mindie_reader import load_ascend_model

    return load_ascend_model(directory)


def _vllm(directory: Path, config: SlimcConfig) -> nn.Module:
    from slimc.frontends import frontend_for
    from slimc.ir.source import resolve_model_source

    require_extra("vllm", f"reading the compressed-tensors checkpoint {directory}")
    source = resolve_model_source(directory, trust_remote_code=config.model.trust_remote_code)
    if source.config.quantization_config.get("transform_config"):
        raise DataError(f"{directory} holds online rotations as compressed-tensors transforms, which transformers does "
                        "not apply when it loads a checkpoint; evaluate the output's mindie or onnx format")
    frontend = frontend_for(source, config.model.family)
    return frontend.load(source, dtype=model_dtype(config, source), trust_remote_code=config.model.trust_remote_code)


class OnnxCausalLM(nn.Module):
    """An onnxruntime session of a decoder LLM graph (input_ids → every position's logits), called as a causal LM."""

    def __init__(self, path: Path) -> None:
        from slimc.backends.onnx import inference_session

        super().__init__()
        self.session = inference_session(path)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> CausalLMOutput:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy()})
        return CausalLMOutput(logits=torch.from_numpy(logits))


def _onnx(directory: Path, config: SlimcConfig) -> nn.Module:
    from slimc.backends.onnx import DESCRIPTION_FILE

    description = json.loads((directory / DESCRIPTION_FILE).read_text())
    inputs = [entry["name"] for entry in description["inputs"]]
    if inputs != ["input_ids"]:
        raise DataError(f"{directory}: slimc eval runs ONNX graphs of decoder LLMs (input_ids → logits), this one takes "
                        f"{', '.join(inputs)}; evaluate the output's mindie format")
    logits = next(entry for entry in description["outputs"] if entry["name"] == "logits")
    if logits["shape"][1] == 1:
        raise DataError(f"{directory}: the graph returns the last position's logits only (export option `logits: last`), "
                        "and evaluation compares every position's; export with `logits: all` to evaluate it")
    return OnnxCausalLM(directory / description["model"]).eval()


READERS = {"mindie": _mindie, "vllm": _vllm, "onnx": _onnx}
