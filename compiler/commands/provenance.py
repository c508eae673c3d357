"""What a compile was made from, recorded in its report (`provenance` in slimc_report.json): slimc's and the
libraries' versions, the config as resolved (after upgrades and `--set`), the model and the calibration data
(each by a hash), and the device.

Weights are identified by their index, not their bytes: hashing hundreds of GB would cost more than many
compiles. A checkpoint's index names every tensor's shard; a single weight file's header names every tensor's
dtype, shape and place in the file; a GGUF file's header holds its metadata and tensor table.
"""

from __future__ import annotations

import hashlib
import platform
import struct
from pathlib import Path
from typing import IO

import gguf
import torch

from slimc import __version__
from slimc.config import SlimcConfig
from slimc.environment import library_versions
from slimc.ir.source import DIFFUSERS_INDEX, SAFETENSORS_INDEX, ModelSource, weight_files

# GGUF value types by the struct format of one value; strings and arrays are read item by item.
GGUF_SCALARS = {
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b", gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h", gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.BOOL: "?", gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q", gguf.GGUFValueType.FLOAT64: "d",
}


def provenance(config: SlimcConfig, source: ModelSource, batches: list[dict]) -> dict:
    """What the report records of where the output came from."""
    return {
        "slimc": __version__,
        "config": {"file": config.source_file, "resolved": config.resolved()},
        "model": {"path": str((source.path / (source.gguf_file or "")).resolve()), "architecture": source.architecture,
                  "weight_index": weight_index_digests(source)},
        "calibration": {"dataset": config.calibration.dataset, "batches": len(batches),
                        "sha256": calibration_fingerprint(batches)},
        "libraries": library_versions(),
        "device": device_description(config.model.device),
    }


def resume_identity(record: dict) -> dict:
    """What a resumed compile must share with the interrupted one (`slimc.journal`): of its provenance, what decides
    the numbers: slimc's and the libraries' versions, the resolved config, the weights, the calibration data and
    the device kind (not the config file's or the model's path, nor the operating system's version). The export
    formats are left out: they are written after every block, so a compile that a format refused resumes with
    that format changed; and so is `memory.activations_gb`, which changes where activations wait, not their values
    (a compile that ran out of memory resumes with a budget)."""
    return {
        "slimc": record["slimc"],
        "libraries": record["libraries"],
        "config": identity_config(record["config"]["resolved"]),
        "model": {key: record["model"][key] for key in ("architecture", "weight_index")},
        "calibration": record["calibration"],
        "device": {key: record["device"][key] for key in ("configured", "name")},
    }


def identity_config(resolved: dict) -> dict:
    """Of a resolved config, what a resumed compile must share (see `resume_identity`)."""
    config = {key: value for key, value in resolved.items() if key != "export"}
    config["memory"] = {key: value for key, value in config["memory"].items() if key != "activations_gb"}
    return config


def weight_index_digests(source: ModelSource) -> list[dict]:
    """For each weight directory of the source: the sha256 of its index file, else of its weight file's header
    (`hashed`: "file" or "header"); `file` is relative to the model path."""
    if source.is_gguf:
        file = source.path / source.gguf_file
        return [{"file": source.gguf_file, "hashed": "header", "sha256": _digest(file, gguf_header_length(file))}]
    index_name = DIFFUSERS_INDEX if source.library == "diffusers" else SAFETENSORS_INDEX
    digests = []
    for directory in sorted({file.parent for file in weight_files(source)}):
        index = directory / index_name
        if index.is_file():
            digests.append({"file": str(index.relative_to(source.path)), "hashed": "file",
                            "sha256": hashlib.sha256(index.read_bytes()).hexdigest()})
            continue
        for file in sorted(f for f in weight_files(source) if f.parent == directory):
            with file.open("rb") as f:
                header_length = 8 + int.from_bytes(f.read(8), "little")
            digests.append({"file": str(file.relative_to(source.path)), "hashed": "header",
                            "sha256": _digest(file, header_length)})
    return digests


def gguf_header_length(file: Path) -> int:
    """The bytes of a GGUF file before its tensor data: magic, version, metadata and tensor table. Read by hand:
    gguf's own reader decodes every vocabulary entry into arrays, seconds for a large vocabulary."""
    with file.open("rb") as f:
        _magic, _version, tensors, fields = _read(f, "4sIQQ")
        for _ in range(fields):
            f.seek(_read(f, "Q")[0], 1)  # the key
            _skip_gguf_value(f, _read(f, "I")[0])
        for _ in range(tensors):
            f.seek(_read(f, "Q")[0], 1)  # the name
            dimensions = _read(f, "I")[0]
            f.seek(8 * dimensions + 4 + 8, 1)  # the shape, the type, the offset
        return f.tell()


def _skip_gguf_value(f: IO[bytes], kind: int) -> None:
    if kind == gguf.GGUFValueType.STRING:
        f.seek(_read(f, "Q")[0], 1)
    elif kind == gguf.GGUFValueType.ARRAY:
        item, count = _read(f, "IQ")
        if item in GGUF_SCALARS:
            f.seek(struct.calcsize("<" + GGUF_SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _skip_gguf_value(f, item)
    else:
        f.seek(struct.calcsize("<" + GGUF_SCALARS[kind]), 1)


def _read(f: IO[bytes], layout: str) -> tuple:
    return struct.unpack("<" + layout, f.read(struct.calcsize("<" + layout)))


def _digest(file: Path, length: int) -> str:
    with file.open("rb") as f:
        return hashlib.sha256(f.read(length)).hexdigest()


def calibration_fingerprint(batches: list[dict]) -> str:
    """sha256 of the calibration batches as the model receives them (tokens, pixels, recorded transformer inputs):
    each tensor's dtype, shape and bytes, every other value's repr, in order. The same data, tokenizer and
    settings give the same hash, whatever the frontend."""
    digest = hashlib.sha256()

    def feed(value: object) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            # Copied into a fresh 1-D tensor: a size-1 dimension may keep stride 0 (recorded diffusion inputs have
            # them) through contiguous() and clone(), and such a tensor cannot be viewed as bytes.
            flat = torch.empty(tensor.numel(), dtype=tensor.dtype).copy_(tensor.reshape(-1))
            digest.update(flat.view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key, item in value.items():
                digest.update(repr(key).encode())
                feed(item)
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(batches)
    return digest.hexdigest()


def device_description(device: str) -> dict:
    """The configured device and what it is: the accelerator's name, or the CPU's architecture."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        name = torch.cuda.get_device_name(int(index or 0))
    elif kind == "npu":
        name = torch.npu.get_device_name(int(index or 0))  # registered by torch_npu (compile.check_device)
    else:
        name = platform.processor() or platform.machine()
    return {"configured": device, "name": name, "platform": platform.platform(), "torch": torch.__version__}
