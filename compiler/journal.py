"""The journal of a streamed compile: what each finished block left, committed beside the output so that an
interrupted compile continues where it stopped (`slimc compile --resume`).

`.<out>.resume/` holds, per committed block, its tensors (the block's spill file, `<block>.safetensors`) and its
rewritten graph (`<block>.graph.pt`: the traced block pickled with its leaves on the meta device, so only the nodes
passes inserted carry data); and, for the last committed block, the state the next block starts from
(`<block>.inputs/`: its calibration inputs, a file per batch, so that neither writing nor reading them holds them
all in memory; `<block>.state.pt`: the passes' own state, the program's quantization annotations, the report's
entries and the RNG state). `manifest.json` lists the committed blocks and what the compile was made
from; it is replaced in one rename after a block's files are complete, so a process killed at any moment leaves
the blocks it lists whole. A resumed compile redoes only what the manifest does not list, and writes the same
files as one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimc import __version__
from slimc.errors import ConfigError, ExportError
from slimc.ir import Block, Program
from slimc.ir.capture import BlockInput
from slimc.ir.program import QuantSpec, Rotations
from slimc.pass_base import Pass
from slimc.report import LayerRecord, RunReport

MANIFEST = "manifest.json"
JOURNAL_FORMAT = 2  # 2: the next block's inputs a file per batch


def journal_directory(out_dir: Path) -> Path:
    """Where the journal of a compile writing `out_dir` lives: beside it, under a fixed name `--resume` finds."""
    out_dir = out_dir.resolve()
    return out_dir.parent / f".{out_dir.name}.resume"


@dataclass
class BlockState:
    """What the compile carries from one block to the next, beyond the blocks' own files and its calibration inputs."""

    steps: list[Pass]
    quant_specs: dict[str, QuantSpec]
    rotations: Rotations
    config_updates: dict[str, Any]
    tied_embeddings: bool
    ascend_metadata: dict[str, Any]
    layers: list[LayerRecord]
    notes: list[str]
    details: dict[str, dict]
    metrics: dict[str, float]
    seconds: dict[str, float]
    cpu_seconds: dict[str, float]
    rng: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def differences(before: Any, now: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ, each with both values."""
    if isinstance(before, dict) and isinstance(now, dict):
        found: list[str] = []
        for key in [*before, *(k for k in now if k not in before)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in now:
                found.append(f"{where}: {before[key]!r} in the interrupted compile, absent now")
            elif key not in before:
                found.append(f"{where}: absent in the interrupted compile, {now[key]!r} now")
            else:
                found.extend(differences(before[key], now[key], where))
        return found
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [found for index, (a, b) in enumerate(zip(before, now)) for found in differences(a, b, f"{path}.{index}")]
    if before != now:
        return [f"{path}: {before!r} in the interrupted compile, {now!r} now"]
    return []


class Journal:
    """The committed blocks of one compile (`open` it before loading the model, to refuse what cannot work early;
    `begin` it once the calibration data is known)."""

    def __init__(self, directory: Path, out_dir: Path, resuming: bool) -> None:
        self.directory = directory
        self.out_dir = out_dir
        self.resuming = resuming
        self.committed: list[str] = []
        self.identity: dict[str, Any] = {}
        self.begun = False  # `begin` accepted this compile: blocks it finishes are committed
        self.kept_states: set[str] = set()  # blocks whose state and next inputs stay when later blocks commit
        self._state_applied = not resuming

    @classmethod
    def open(cls, out_dir: Path, *, resume: bool, overwrite: bool) -> Journal:
        """The journal for `out_dir`: an interrupted compile's with `resume`; else a fresh one, replacing an
        interrupted compile's only with `overwrite` (hours of work are not thrown away by a forgotten flag)."""
        directory = journal_directory(out_dir)
        manifest = read_manifest(directory)
        if resume:
            if manifest is None:
                raise ExportError(f"--resume: no interrupted compile of {out_dir} to continue ({directory / MANIFEST} "
                                  "does not exist); run the compile without --resume")
            journal = cls(directory, out_dir, resuming=True)
            journal.committed = list(manifest["blocks"])
            journal.identity = manifest["identity"]
            return journal
        if manifest is not None and manifest["blocks"] and not overwrite:
            raise ExportError(f"{directory} holds an interrupted compile of {out_dir} ({len(manifest['blocks'])} blocks "
                              "done): pass --resume to continue it, or --overwrite to discard it and start again")
        return cls(directory, out_dir, resuming=False)

    def begin(self, identity: dict[str, Any]) -> None:
        """Record what this compile is made from (a fresh journal replaces any earlier one); a resumed compile must
        be made from the same."""
        if self.resuming:
            changed = differences(self.identity, identity)
            if changed:
                listed = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
                raise ConfigError(f"--resume refused: the interrupted compile in {self.directory} was made from "
                                  f"something else ({listed}). Resume with what it used, or run without --resume "
                                  "and with --overwrite to start again")
            self.begun = True
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        self.identity = identity
        self._write_manifest()
        self.begun = True

    def has(self, block: Block) -> bool:
        return block.name in self.committed

    def block_file(self, block_name: str, kind: str) -> Path:
        return self.directory / f"{block_name}.{kind}"

    def commit(self, program: Program, block: Block, state: BlockState, inputs: Sequence[BlockInput]) -> None:
        """Record a finished block, already spilled to `block_file(name, "safetensors")` by the program: its graph,
        the state after it and the next block's calibration `inputs` (read one at a time), then the manifest naming
        it (the moment it counts), then drop the previous state."""
        if block.traced is not None:
            _save(block.traced, self.block_file(block.name, "graph.pt"))
        batches = self.block_file(block.name, "inputs")
        shutil.rmtree(batches, ignore_errors=True)  # left by a compile killed while writing them
        batches.mkdir()
        for index, batch in enumerate(inputs):
            _save(batch, batches / f"{index}.pt")
        state.rng = rng_state()
        _save(state, self.block_file(block.name, "state.pt"))
        previous = self.committed[-1] if self.committed else None
        self.committed.append(block.name)
        self._write_manifest()
        if previous is not None and previous not in self.kept_states:
            self.block_file(previous, "state.pt").unlink(missing_ok=True)
            shutil.rmtree(self.block_file(previous, "inputs"), ignore_errors=True)

    def restore_block(self, program: Program, block: Block) -> None:
        """Give a committed block its rewritten graph and its tensors (read from its file when a forward or an
        export needs them)."""
        graph = self.block_file(block.name, "graph.pt")
        if graph.exists():
            traced = torch.load(graph, weights_only=False)
            traced.attach(block.module)
            block.traced = traced
        program.weights.adopt(block.name, self.block_file(block.name, "safetensors"))

    def restore_state(self, steps: list[Pass], program: Program, report: RunReport) -> Iterator[BlockInput] | None:
        """Once, after the passes' `prepare`: put back what the last committed block left; returns the next block's
        calibration inputs, each read when the iterator reaches it (None if nothing was committed)."""
        if self._state_applied or not self.committed:
            return None
        self._state_applied = True
        state: BlockState = torch.load(self.block_file(self.committed[-1], "state.pt"), weights_only=False)
        steps[:] = state.steps
        program.quant_specs = state.quant_specs
        program.rotations = state.rotations
        program.config_updates = state.config_updates
        program.tied_embeddings = state.tied_embeddings
        program.ascend_metadata = state.ascend_metadata
        report.layers, report.notes, report.metrics = state.layers, state.notes, state.metrics
        report.details = {**report.details, **state.details}
        for times, restored in ((report.seconds, state.seconds), (report.cpu_seconds, state.cpu_seconds)):
            for step, seconds in restored.items():
                times[step] = times.get(step, 0.0) + seconds
        report.note(f"resumed after {len(self.committed)} committed blocks (the last {self.committed[-1]})")
        torch.set_rng_state(state.rng["torch"])
        random.setstate(state.rng["python"])
        batches = self.block_file(self.committed[-1], "inputs")
        count = len(list(batches.glob("[0-9]*.pt")))
        return (torch.load(batches / f"{index}.pt", weights_only=False) for index in range(count))

    def close(self) -> None:
        """The output is published: the journal is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _write_manifest(self) -> None:
        manifest = {"format": JOURNAL_FORMAT, "slimc": __version__, "identity": self.identity, "blocks": self.committed}
        temporary = self.directory / f".{MANIFEST}.{os.getpid()}"
        temporary.write_text(json.dumps(manifest, indent=1))
        os.replace(temporary, self.directory / MANIFEST)


def continue_from(earlier: Path, out_dir: Path, changed: Collection[str], config: dict) -> int:
    """Start the journal of a compile of `out_dir` with the blocks an earlier compile's journal (`earlier`) committed
    before the first that holds a `changed` layer, as if a compile made from the resolved `config` (and the earlier
    one's model, data and versions) had stopped after them; `--resume` continues it. Returns how many blocks it
    holds: 0, with nothing written, where the earlier journal did not keep the state after the last of them
    (`Journal.kept_states`). The files are hard links where the file system allows."""
    manifest = read_manifest(earlier)
    if manifest is None:
        return 0
    blocks = manifest["blocks"]
    unchanged = next((i for i, block in enumerate(blocks) if any(name.startswith(f"{block}.") for name in changed)),
                     len(blocks))
    kept = blocks[:unchanged]
    if not kept or not (earlier / f"{kept[-1]}.state.pt").is_file():
        return 0
    directory = journal_directory(out_dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    names = [f"{block}.{kind}" for block in kept for kind in ("safetensors", "graph.pt")] + [f"{kept[-1]}.state.pt"]
    for name in names:
        if (earlier / name).is_file():
            _link(earlier / name, directory / name)
    (directory / f"{kept[-1]}.inputs").mkdir()
    for batch in (earlier / f"{kept[-1]}.inputs").iterdir():
        _link(batch, directory / f"{kept[-1]}.inputs" / batch.name)
    journal = Journal(directory, out_dir, resuming=False)
    journal.identity = {**manifest["identity"], "config": config}
    journal.committed = kept
    journal._write_manifest()
    return len(kept)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != JOURNAL_FORMAT:
        raise ExportError(f"{path} was written by slimc {manifest.get('slimc')} in another journal format; it cannot be "
                          "resumed by this version: run without --resume and with --overwrite to start again")
    return manifest


def _save(value: Any, path: Path) -> None:
    """Write in one rename, so a killed process leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    torch.save(value, temporary)
    os.replace(temporary, path)
