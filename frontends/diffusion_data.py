"""Calibration data for diffusion transformers: prompts, and the transformer inputs a pipeline makes from them.

A diffusion transformer is calibrated on what its pipeline feeds it: the pipeline is run on each
prompt with the `calibration.diffusion` settings (steps, size, frames, guidance, seed), latents
only, and a forward pre-hook records the keyword arguments of every transformer call — every
step, and both calls of a step under classifier-free guidance. Each recorded call is one
calibration batch, tagged with the pipeline component that ran it (`transformer`, or
`transformer_2` for Wan2.2's low-noise steps).

Prompts come from a built-in set (`builtin:prompts` for calibration, the disjoint
`builtin:prompts-eval` for evaluation), a .txt file (one prompt per line) or a .jsonl file of
`{"prompt": ...}` lines. Without the pipeline (a transformer directory alone), calibration reads
recorded inputs from a .safetensors file written by `slimc record` (layout in `save_recorded_calls`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from slimc.config import CalibrationConfig, DiffusionSampling
from slimc.errors import DataError
from slimc.frontends.data import jsonl_strings, text_lines
from slimc.ir.hooks import Hooks, temporary_hooks
from slimc.progress import tracked

PROMPT_SPECS = ("builtin:prompts", "builtin:prompts-eval")
FORMAT = "slimc.transformer_inputs"
FORMAT_VERSION = "1"
CALLS_KEY = "slimc.calls"
DEFAULT_EXPERT = "transformer"
RECORD_FIX = ("record them from the pipeline directory with `slimc record CONFIG --model PIPELINE_DIR --out inputs.safetensors` "
              "and set calibration.dataset to that file, or pass the pipeline directory (the one with model_index.json) as --model")

# Scene descriptions written for slimc: varied subjects, settings, light, motion and styles.
# The two sets share no prompt; the order is fixed, so `samples: n` always takes the same n.
_CALIBRATION_PROMPTS = (
    "a red fox trotting through fresh snow at dawn, breath visible in the cold air",
    "a busy night market in a narrow street, paper lanterns, steam rising from food stalls",
    "an astronaut floating inside a space station, Earth visible through the round window",
    "close-up of a hummingbird hovering at a purple flower, wings blurred",
    "a lighthouse on a rocky cliff during a storm, huge waves crashing below",
    "a child building a sandcastle on a sunny beach, gulls overhead",
    "an old library with tall wooden shelves, dust floating in beams of afternoon light",
    "a bowl of ramen with a soft-boiled egg, chopsticks lifting noodles, shallow depth of field",
    "a herd of elephants crossing a dusty savanna at sunset",
    "a futuristic city skyline with flying cars between glass towers, blue hour",
    "a watercolor painting of a quiet canal in Venice with a single gondola",
    "a golden retriever running through a field of tall grass toward the camera",
    "rain running down a café window, blurred city lights outside",
    "a potter shaping a clay vase on a spinning wheel, hands covered in wet clay",
    "a snow-covered mountain village at night, warm light in every window",
    "macro photo of dew drops on a spider web in the early morning",
    "a vintage red car driving along a coastal road, drone shot from above",
    "a jazz band playing on a small stage in a dim, smoky club",
    "a field of sunflowers under a dramatic thunderstorm sky",
    "an octopus changing color as it crawls over a coral reef",
    "a chef flambéing vegetables in a wok, flames leaping up",
    "a paper boat floating down a rain-filled gutter in an old town",
    "a pixel-art castle on a hill with a dragon circling the tower",
    "a ballet dancer mid-leap in an empty rehearsal studio with large windows",
    "a desert highway stretching to the horizon, heat shimmer on the asphalt",
    "a steaming cup of coffee on a wooden table next to an open notebook",
    "autumn leaves swirling in the wind in a city park",
    "a polar bear and her cub walking across sea ice under a pale sun",
    "an oil painting of a farmhouse kitchen with copper pots and a bread loaf",
    "a surfer riding the inside of a turquoise wave, water spraying",
    "a crowded subway platform as a train pulls in, motion blur",
    "a cat sleeping on a windowsill in a patch of sunlight",
    "a glowing jellyfish drifting in dark deep water",
    "a medieval knight in shining armor standing in a misty forest",
    "fireworks bursting over a harbor, reflections on the water",
    "a 3D render of a cute robot watering plants in a greenhouse",
    "a waterfall in a lush rainforest, mist and rainbows in the spray",
    "an elderly man playing chess in a park, fallen leaves on the table",
    "a hot air balloon festival at sunrise, dozens of colorful balloons rising",
    "a neon-lit arcade with rows of retro game machines",
)
_EVALUATION_PROMPTS = (
    "a wolf howling on a ridge under a full moon",
    "a flower shop on a street corner with buckets of tulips outside",
    "a sailboat gliding across a calm lake at golden hour",
    "a scientist looking through a microscope in a bright laboratory",
    "a storm of cherry blossom petals blowing along a temple path",
    "a tiger walking slowly through tall jungle grass",
    "a charcoal sketch of a bridge over a river in winter",
    "a violinist performing on a rooftop at dusk, city lights below",
    "a plate of pancakes with berries and syrup being poured",
    "a train crossing a stone viaduct in green hills, smoke trailing",
    "a school of silver fish turning together in clear blue water",
    "a cyberpunk alley with holographic signs and puddles reflecting pink light",
    "two kids flying a kite on a windy hill",
    "a candle flickering in a dark room, wax dripping",
    "an eagle diving toward a river to catch a fish",
    "a cozy cabin interior with a fireplace, knitted blankets and a sleeping dog",
    "a clay animation style scene of a snail racing a turtle",
    "sand dunes rippling in the wind, long shadows at sunset",
    "a blacksmith hammering glowing metal on an anvil, sparks flying",
    "a market stall piled with oranges, lemons and pomegranates",
)
_BUILTIN_PROMPTS = {"builtin:prompts": _CALIBRATION_PROMPTS, "builtin:prompts-eval": _EVALUATION_PROMPTS}


@dataclass
class RecordedCall:
    """One call of a pipeline's transformer: its keyword arguments and the component that ran it."""

    expert: str
    kwargs: dict[str, Any]


# --- prompts ---------------------------------------------------------------------------------------


def load_prompts(spec: str, samples: int | None = None) -> list[str]:
    """The first `samples` prompts (all if None) of a built-in set, a .txt file (one per line) or a .jsonl file."""
    if spec.startswith("builtin:"):
        if spec not in _BUILTIN_PROMPTS:
            raise DataError(f"unknown built-in prompt set {spec!r}; use one of {', '.join(PROMPT_SPECS)}, a .txt file "
                            "(one prompt per line) or a .jsonl file of {\"prompt\": ...} lines")
        prompts = list(_BUILTIN_PROMPTS[spec])
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"prompt file {path} does not exist; give a .txt (one prompt per line) or .jsonl file, "
                            f"or one of {', '.join(PROMPT_SPECS)}")
        if path.suffix == ".txt":
            found = (line.strip() for _, line in text_lines(path) if line.strip())
        elif path.suffix == ".jsonl":
            found = jsonl_strings(path, "prompt", '{"prompt": "a cat"}')
        else:
            raise DataError(f"dataset {path} has an unsupported type for a diffusion model; use a .txt file (one prompt "
                            "per line), a .jsonl file of {\"prompt\": ...} lines, or a .safetensors file of recorded inputs")
        prompts = list(itertools.islice(found, samples))  # read no further than the prompts used
        if not prompts:
            raise DataError(f"prompt file {path} holds no prompt; fill it or use {PROMPT_SPECS[0]}")
    if samples is not None:
        if samples > len(prompts):
            warnings.warn(f"{spec} has {len(prompts)} prompts, not {samples}; using {len(prompts)}", UserWarning, stacklevel=2)
        prompts = prompts[:samples]
    return prompts


# --- dtypes ----------------------------------------------------------------------------------------


def compute_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype a transformer computes in. diffusers' `dtype` skips the parameters of `_keep_in_fp32_modules`
    (a bfloat16 Wan keeps `scale_shift_table`, its first parameter, and its norms in float32); pipelines cast
    latents and text embeddings to it."""
    declared = getattr(transformer, "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return next((p.dtype for p in transformer.parameters() if p.is_floating_point()), torch.float32)


def cast_floats(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Floating-point tensor arguments in `dtype` (integer timesteps stay integers), the others as they are."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


# --- recording a pipeline --------------------------------------------------------------------------


def pipeline_call_kwargs(pipeline: Any, sampling: DiffusionSampling) -> dict[str, Any]:
    """The `pipeline(...)` arguments for the sampling settings (latents out; frames for video pipelines only)."""
    accepted = inspect.signature(type(pipeline).__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": sampling.steps, "height": sampling.height, "width": sampling.width,
                              "output_type": "latent"}
    if "num_frames" in accepted:
        kwargs["num_frames"] = sampling.frames
    if sampling.guidance_scale is not None:
        kwargs["guidance_scale"] = sampling.guidance_scale
    if sampling.max_sequence_length is not None:
        kwargs["max_sequence_length"] = sampling.max_sequence_length
    return kwargs


class _Recorder:
    """Forward pre-hooks on a pipeline's transformers that keep every call's keyword arguments on the CPU.

    Floating-point tensors are kept in the compute dtype of the transformer called: a pipeline may pass
    one argument in several dtypes over its steps (HunyuanVideo makes its first latents, and the timestep
    cast to their dtype, in float32; the scheduler returns later ones in the transformer's dtype), and
    the transformer computes in one. A tensor the pipeline passes again (the prompt embeddings at every
    step) is kept once."""

    def __init__(self, transformers: dict[str, nn.Module], hooks: Hooks) -> None:
        self.calls: list[RecordedCall] = []
        self._kept: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, module in transformers.items():
            parameters = [p.name for p in inspect.signature(module.forward).parameters.values()]
            dtype = compute_dtype(module)
            hooks.before(module, lambda m, args, kwargs, n=name, p=parameters, d=dtype: self._record(n, p, d, args, kwargs),
                         with_kwargs=True)

    def _record(self, expert: str, parameters: list[str], dtype: torch.dtype, args: tuple, kwargs: dict) -> None:
        named = {**dict(zip(parameters, args)), **kwargs}
        self.calls.append(RecordedCall(expert, {k: self._keep(v, dtype) for k, v in named.items()}))

    def _keep(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor):
            return copy.deepcopy(value)
        key = (id(value), dtype)
        if key not in self._kept:
            kept = value.detach().to("cpu", copy=value.device.type != "cpu")
            self._kept[key] = (value, kept.to(dtype) if kept.is_floating_point() else kept)
        return self._kept[key][1]


def load_pipeline(pipeline_dir: str | Path, dtype: torch.dtype, transformers: dict[str, nn.Module]) -> Any:
    """The diffusers pipeline in `pipeline_dir`, in `dtype`, holding the already loaded `transformers`
    (component name -> module) instead of loading them again.

    diffusers loads an optional component from disk even when it is passed (both of Wan's transformers are
    optional), so the pipeline is read from a view of the directory whose model_index.json lists the passed
    components as absent; diffusers then takes the passed modules for them.
    """
    from diffusers import DiffusionPipeline

    pipeline_dir = Path(pipeline_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="slimc-pipeline-") as view:
            index = json.loads((pipeline_dir / "model_index.json").read_text(encoding="utf-8"))
            index.update({name: [None, None] for name in transformers})
            (Path(view) / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
            for entry in pipeline_dir.iterdir():
                if entry.name != "model_index.json" and entry.name not in transformers:
                    (Path(view) / entry.name).symlink_to(entry.resolve())
            return DiffusionPipeline.from_pretrained(view, torch_dtype=dtype, use_safetensors=True, **transformers)
    except (OSError, ValueError) as error:
        raise DataError(f"could not load the diffusers pipeline in {pipeline_dir} to record calibration inputs: "
                        f"{str(error).splitlines()[0]}; check that every component folder is complete") from None


@torch.no_grad()
def record_pipeline_calls(pipeline_dir: str | Path, prompts: list[str], sampling: DiffusionSampling, *,
                          transformers: dict[str, nn.Module] | None = None, dtype: torch.dtype = torch.float32,
                          device: str = "cpu", batch_size: int = 1, progress: bool = True) -> list[RecordedCall]:
    """Run the diffusers pipeline in `pipeline_dir` on `prompts` (`batch_size` per call) and record every call
    of its transformer(s), floating-point arguments in the transformer's compute dtype.

    `dtype` is the pipeline's (the text encoders and VAE load in it). `transformers` are already loaded
    components to use instead of loading them again (component name -> module); they are moved back to the
    CPU afterwards. The pipeline's own defaults (prompt template, negative prompt, guidance of the second
    expert) are kept. Generator seeds are `sampling.seed + i` for the i-th pipeline call, so the recording
    does not depend on the device.
    """
    transformers = dict(transformers or {})
    pipeline = load_pipeline(pipeline_dir, dtype, transformers)
    components = {name: getattr(pipeline, name) for name in ("transformer", "transformer_2")
                  if isinstance(getattr(pipeline, name, None), nn.Module)}
    pipeline.set_progress_bar_config(disable=True)
    call_kwargs = pipeline_call_kwargs(pipeline, sampling)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    try:
        with temporary_hooks() as hooks:
            recorder = _Recorder(components, hooks)
            if device != "cpu":
                pipeline.to(device)
            for index, batch in enumerate(tracked(batches, "recording transformer inputs", "batch", shown=progress)):
                generator = torch.Generator().manual_seed(sampling.seed + index)
                pipeline(prompt=batch, generator=generator, **call_kwargs)
    finally:
        if device != "cpu":
            pipeline.to("cpu")
        for module in transformers.values():
            module.to("cpu")
    return recorder.calls


# --- recorded inputs on disk -----------------------------------------------------------------------


def save_recorded_calls(calls: list[RecordedCall], path: str | Path) -> Path:
    """Write recorded transformer calls to one .safetensors file.

    Layout: the tensor argument `k` of call `i` is the tensor named `"{i}.{k}"`. The file's metadata
    holds `"format": "slimc.transformer_inputs"`, `"version": "1"` and `"slimc.calls"`: a JSON list with,
    per call, `{"expert": component name, "constants": {non-tensor arguments, as JSON}, "same_as":
    {argument: tensor name}}` — `same_as` points a tensor that an earlier call passed too (the prompt
    embeddings of every step) at its first copy, which is stored once. A file of only `"{i}.{k}"` tensors
    (no metadata) reads as calls of `transformer` without constant arguments.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DataError(f"recorded inputs are written as .safetensors; got {path.name}")
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[int, str] = {}
    entries = []
    for index, call in enumerate(calls):
        entry: dict[str, Any] = {"expert": call.expert, "constants": {}, "same_as": {}}
        for key, value in call.kwargs.items():
            if isinstance(value, torch.Tensor):
                if id(value) in stored:
                    entry["same_as"][key] = stored[id(value)]
                else:
                    name = stored[id(value)] = f"{index}.{key}"
                    tensors[name] = value.detach().cpu().contiguous()
            else:
                try:
                    json.dumps(value)
                except TypeError:
                    raise DataError(f"call {index} argument {key!r} is a {type(value).__name__}, which cannot be "
                                    "written as JSON; recorded inputs hold tensors and JSON values only") from None
                entry["constants"][key] = value
        entries.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, CALLS_KEY: json.dumps(entries)}
    save_file(tensors, path, metadata=metadata)
    return path


def load_recorded_calls(path: str | Path) -> list[RecordedCall]:
    """Read a file written by `save_recorded_calls` (or a plain file of `"{call}.{argument}"` tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"recorded inputs file {path} does not exist; {RECORD_FIX}")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path} is not a readable safetensors file ({error}); {RECORD_FIX}") from None
    by_call: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or not key:
            raise DataError(f"{path}: tensor {name!r} is not named '<call index>.<argument>' (e.g. '0.hidden_states'); "
                            "see docs/calibration.md for the layout")
        by_call.setdefault(int(index), {})[key] = tensor
    if CALLS_KEY not in metadata:
        if not by_call:
            raise DataError(f"{path} holds no tensors; {RECORD_FIX}")
        return [RecordedCall(DEFAULT_EXPERT, by_call.get(i, {})) for i in range(max(by_call) + 1)]
    if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: metadata says format {metadata.get('format')!r} version {metadata.get('version')!r}; "
                        f"this slimc reads {FORMAT!r} version {FORMAT_VERSION!r}; record the inputs again")
    try:
        entries = json.loads(metadata[CALLS_KEY])
        calls = []
        for index, entry in enumerate(entries):
            kwargs = dict(entry.get("constants", {}))
            kwargs.update(by_call.get(index, {}))
            kwargs.update({key: tensors[name] for key, name in entry.get("same_as", {}).items()})
            calls.append(RecordedCall(str(entry["expert"]), kwargs))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: the {CALLS_KEY!r} metadata is malformed ({type(error).__name__}: {error}); record the inputs again") from None
    if not calls:
        raise DataError(f"{path} holds no recorded calls; {RECORD_FIX}")
    return calls


# --- calibration -----------------------------------------------------------------------------------


def is_recorded_inputs(spec: str) -> bool:
    return spec.endswith(".safetensors")


def calibration_calls(calibration: CalibrationConfig, pipeline_dir: Path | None, experts: tuple[str, ...], *,
                      transformers: dict[str, nn.Module] | None = None, dtype: torch.dtype = torch.float32,
                      device: str = "cpu", transformer_dir: Path | None = None) -> list[RecordedCall]:
    """The calibration calls of the transformers named `experts`, checked to share one structure per expert.

    `dtype` is the transformers' compute dtype: the pipeline runs in it, and floating-point inputs are in it.

    From a pipeline (`pipeline_dir`): run it on the prompts of `calibration.dataset`, or read recorded inputs
    when the dataset is a .safetensors file. From a transformer directory alone (`pipeline_dir` None, one
    expert): recorded inputs only; a file recorded from several experts is narrowed to the one named like
    `transformer_dir` (`.../transformer_2`).
    """
    spec = calibration.dataset
    if is_recorded_inputs(spec):
        calls = load_recorded_calls(spec)
        calls = _select_experts(calls, experts, spec, None if pipeline_dir is not None else transformer_dir)
        calls = [RecordedCall(c.expert, cast_floats(c.kwargs, dtype)) for c in calls]
    elif pipeline_dir is None:
        raise DataError(f"{transformer_dir} is a diffusion transformer without its pipeline, so slimc cannot turn the prompts "
                        f"of {spec!r} into its inputs; {RECORD_FIX}")
    else:
        prompts = load_prompts(spec, calibration.samples)
        calls = record_pipeline_calls(pipeline_dir, prompts, calibration.diffusion, transformers=transformers, dtype=dtype,
                                      device=device, batch_size=calibration.batch_size)
        calls = [c for c in calls if c.expert in experts]
    check_uniform(calls)
    missing = [e for e in experts if not any(c.expert == e for c in calls)]
    if missing and is_recorded_inputs(spec):
        raise DataError(f"{spec} holds no call of {', '.join(missing)}; record the inputs with enough steps that "
                        "the pipeline runs every expert")
    if missing:
        raise DataError(f"no calibration call reached {', '.join(missing)}: with {calibration.diffusion.steps} steps the "
                        "pipeline never switched to it; use more steps (calibration.diffusion.steps)")
    return calls


def _select_experts(calls: list[RecordedCall], experts: tuple[str, ...], spec: str, transformer_dir: Path | None) -> list[RecordedCall]:
    recorded = sorted({c.expert for c in calls})
    if transformer_dir is not None:  # one transformer without its pipeline
        if len(recorded) == 1:
            return [RecordedCall(experts[0], c.kwargs) for c in calls]
        if transformer_dir.name in recorded:
            return [RecordedCall(experts[0], c.kwargs) for c in calls if c.expert == transformer_dir.name]
        raise DataError(f"{spec} holds inputs of {', '.join(recorded)}, and {transformer_dir.name!r} names none of them; "
                        "pass the transformer directory as the pipeline names it (e.g. PIPELINE/transformer_2), or record "
                        "the inputs of this transformer alone")
    chosen = [c for c in calls if c.expert in experts]
    if not chosen:
        raise DataError(f"{spec} holds inputs of {', '.join(recorded)}, not of {', '.join(experts)}; record them from this pipeline")
    return chosen


def _structure(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("constant", repr(v)) for k, v in kwargs.items()}


def check_uniform(calls: list[RecordedCall]) -> None:
    """Every call of one expert must have the same arguments, tensor shapes and dtypes, and constants: traced
    blocks are specialised to the first. (Recorded floating-point tensors are already in the transformer's
    compute dtype, so only a float against an integer tensor can differ in dtype.)"""
    first: dict[str, tuple[int, dict]] = {}
    for index, call in enumerate(calls):
        structure = _structure(call.kwargs)
        if call.expert not in first:
            first[call.expert] = (index, structure)
            continue
        reference_index, reference = first[call.expert]
        if structure != reference:
            key = next(k for k in sorted(set(structure) | set(reference)) if structure.get(k) != reference.get(k))
            ours, theirs = structure.get(key), reference.get(key)
            if ours is not None and theirs is not None and ours[0] == theirs[0] != "constant":
                fix = "record every call with the argument in one dtype"
            else:
                fix = "record every prompt with the same height, width, frames and max_sequence_length"
            raise DataError(
                f"calibration call {index} ({call.expert}) differs from call {reference_index} in {key!r}: "
                f"{_describe(ours)} vs {_describe(theirs)}. Traced blocks are specialised to one input structure: {fix}"
            )


def _describe(entry: Any) -> str:
    if entry is None:
        return "absent"
    if entry[0] == "constant":
        return entry[1]
    return f"{entry[1]} tensor of shape {entry[0]}"


def summary(calls: list[RecordedCall]) -> str:
    counts = Counter(c.expert for c in calls)
    return ", ".join(f"{n} calls of {expert}" for expert, n in counts.items())
