"""The YAML config: safe loading, typed validation, `--set` overrides, messages that point at the line.

    version: 2
    model: {family: auto, dtype: auto}
    calibration: {dataset: builtin:text, samples: 128, seq_len: 512}
    schemes: {w8a8_dynamic: {weight: {...}, act: {...}}}
    pipeline: [{pass: norm_fusion}, {pass: smooth, alpha: 0.8}, ...]
    export: [{format: mindie}]

Each pipeline step is typed when the config loads: its `pass:` names the class (slimc.config.steps),
whose fields validate the step's other keys, and every step's ordering declarations are checked.
Export parameters are validated by the backend class when the exports are built.
A file of an older `version` is upgraded in memory (slimc.config.versions), with one warning saying so.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimc.config.steps import PassStep, check_order, pass_class
from slimc.config.versions import CONFIG_VERSION, upgrade
from slimc.errors import ConfigError
from slimc.schemes import QuantScheme

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 20_000  # the largest shipped config has about a hundred
_SCALARS = yaml.constructor.SafeConstructor()  # plain tags only (checked first): builds the typed scalar of a node
PLAIN_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("str", "int", "float", "bool", "null", "map", "seq")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    path: str | None = None
    family: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False


class DiffusionSampling(_Strict):
    """How a diffusers pipeline is run on the calibration prompts to record its transformer's inputs."""

    steps: int = Field(20, gt=0)
    height: int = Field(512, gt=0)
    width: int = Field(512, gt=0)
    frames: int = Field(1, gt=0)  # video pipelines (HunyuanVideo, Wan)
    guidance_scale: float | None = None  # None: the pipeline's default
    max_sequence_length: int | None = Field(None, gt=0)  # text tokens; None: the pipeline's default
    seed: int = 0


HF_PREFIX = "hf:"  # a Hugging Face `datasets` dataset: a name on the Hub (read from the local cache) or a local path


class _Dataset(_Strict):
    """A dataset spec, and for a `hf:` dataset which split and which text column to read."""

    dataset: str = "builtin:text"
    split: str | None = None  # None: "train" (a dataset saved whole, without splits, is read as it is)
    column: str | None = None  # None: "text"

    @model_validator(mode="after")
    def _hub_keys_need_a_hub_dataset(self) -> _Dataset:
        given = [key for key in ("split", "column") if getattr(self, key) is not None]
        if given and not (self.dataset or "").startswith(HF_PREFIX):
            raise ValueError(f"{' and '.join(given)} name a split and a text column of a Hugging Face dataset, "
                             f"given as dataset: {HF_PREFIX}<name or path>; {self.dataset!r} is not one: remove them")
        return self


class CalibrationConfig(_Dataset):
    samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0)
    # Multimodal: images are resized to image_size × image_size, so every batch gives the vision
    # tower the same number of patches (and windows) that its traced blocks were specialised to.
    image_size: int = Field(448, gt=0)
    # Omni: every audio clip is clipped or padded with silence to audio_seconds, so every batch gives the
    # audio encoder the same number of attention chunks.
    audio_seconds: float = Field(10.0, gt=0)
    diffusion: DiffusionSampling = DiffusionSampling()
    # What the next block of a stage is calibrated on: the outputs of this block as quantized (its quantization
    # error propagates, as at run time; what GPTQ and AutoRound correct for), or of this block as loaded (the float
    # model's activations, as SmoothQuant's statistics; one block run fewer per calibration batch).
    propagate: Literal["quantized", "float"] = "quantized"


class EvaluationConfig(_Dataset):
    """Held-out data for `slimc eval` / `compile --eval`; image size and diffusion sampling come from `calibration`."""

    dataset: str | None = None  # None: the frontend's evaluation dataset (builtin:text-eval for LLMs)
    samples: int = Field(40, gt=0)
    seq_len: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0)


class ChecksConfig(_Strict):
    """The compiler's own checks."""

    equivalence: bool = True  # after each function-preserving pass, the block must still compute the same
    equivalence_tolerance: float | None = Field(None, gt=0)  # relative; None: by the model's dtype
    # the check runs on this many tokens of the first batch (whole rows, evenly spread, at least one); None: all of it
    equivalence_tokens: int | None = Field(512, ge=1)


class MemoryConfig(_Strict):
    """How much of the model host memory holds at once."""

    # Read each block's weights from the checkpoint when the pipeline reaches it (transformers checkpoints in
    # safetensors; GGUF files and diffusers transformers load whole), instead of the whole model at load.
    stream_blocks: bool = True
    # Keep at most this many GB of a block's calibration activations in memory (host, or the accelerator's with
    # model.device), writing the batches beyond it to disk and reading them back each time a pass runs them;
    # None: all in memory.
    activations_gb: float | None = None

    @field_validator("activations_gb")
    @classmethod
    def _positive_budget(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be a number of GB above 0 (e.g. 8), or null to keep every calibration "
                             "activation in memory")
        return value


FLOAT = "float"  # a fallback that leaves the layer unquantized
VALIDATION_DATASET = "builtin:validation"


class TuneConfig(_Strict):
    """Fall back from the configured schemes, most sensitive layers first, until the output meets an accuracy target
    (slimc.commands.tune): after each compile the perplexity on the evaluation data is measured against float's."""

    max_ppl_increase: float = Field(gt=0)  # relative: 0.01 allows the quantized perplexity 1% above float's
    # schemes under `schemes:`, or `float`, tried in this order: each round moves layers one entry further down
    fallback: list[str] = Field(min_length=1)
    step: int = Field(1, gt=0)  # layers moved per round
    max_size_increase: float = Field(0.25, gt=0)  # the output may grow by this fraction of the first round's size
    max_rounds: int = Field(8, gt=0)  # compiles in all, the first (nothing fallen back) included
    # The ranking measures each layer's block error on the first this many calibration batches (null: all): every
    # batch costs one block run per layer, and a ranking needs far fewer tokens than the scales do.
    rank_batches: int | None = Field(8, gt=0)
    # The held-out data the rounds are measured on: by default text no calibration or evaluation spec holds, so
    # a choice made on it can still be judged on the evaluation data.
    dataset: str = VALIDATION_DATASET


class SlimcConfig(_Strict):
    version: int = CONFIG_VERSION  # older versions are upgraded before validation
    model: ModelConfig = ModelConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    schemes: dict[str, QuantScheme] = {}
    pipeline: list[PassStep] = []
    export: list[dict[str, Any]] = []
    checks: ChecksConfig = ChecksConfig()
    memory: MemoryConfig = MemoryConfig()
    tune: TuneConfig | None = None

    source_file: str = Field("<config>", exclude=True)
    lines: dict[tuple, int] = Field(default_factory=dict, exclude=True)

    def where(self, *loc: Any) -> str:
        """'file:line' of the deepest known key of a location, for messages."""
        return _where(self.source_file, self.lines, loc)

    def resolved(self) -> dict[str, Any]:
        """The config as plain data with every default filled in, as a run used it (after version upgrades and
        `--set`); `config_from_data` reads it back. Each pipeline step is its `pass:` and its own fields."""
        data = self.model_dump(mode="json")
        data["pipeline"] = [{"pass": step.name, **step.model_dump(mode="json")} for step in self.pipeline]
        return data


class _WrittenConfig(SlimcConfig):
    """The config as written: its pipeline steps are mappings until the rest of the config is valid."""

    pipeline: list[dict[str, Any]] = []


def _where(source: str, lines: dict[tuple, int], loc: tuple) -> str:
    for end in range(len(loc), -1, -1):
        if tuple(loc[:end]) in lines:
            line = lines[tuple(loc[:end])]
            return f"{source}:{line}" if line > 0 else f"{source} (--set)"
    return source


def _construct(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> Any:
    """Build plain Python data from a composed YAML node, recording each key's line (1-based).

    Aliases are expanded, so a file of nested aliases ("billion laughs") would expand without end: past
    MAX_VALUES values the file is refused."""
    lines[path] = node.start_mark.line + 1
    if len(lines) > MAX_VALUES:
        raise ConfigError(f"line {node.start_mark.line + 1}: the config expands to more than {MAX_VALUES} values "
                          "(aliases of aliases?); a config is a few hundred values: write it out plainly")
    if node.tag not in PLAIN_TAGS:
        raise ConfigError(f"line {node.start_mark.line + 1}: YAML tag {node.tag!r} is not allowed; configs are plain data")
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _SCALARS.construct_object(key_node, deep=True)
            if key in out:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            out[key] = _construct(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), lines) for i, item in enumerate(node.value)]
    return _SCALARS.construct_object(node, deep=True)


def read_config_text(path: Path) -> str:
    """The text of a config file; a missing, oversized, unreadable or non-UTF-8 file is a ConfigError saying so."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is a directory, not a config file; pass a YAML file such as {path / 'w8a8.yaml'}, "
                          "or a shipped config name (slimc configs)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size / 2**20:.1f} MiB; a config is a small YAML file: is this the "
                          "right file?")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (a binary file?); pass a YAML config file") from None
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}; check its permissions") from None


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Safe-load a YAML file into plain data and a map from key path to line number."""
    text = read_config_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    lines: dict[tuple, int] = {}
    data = {} if node is None else _construct(node, (), lines)
    return data, lines


def apply_override(data: dict, assignment: str, lines: dict[tuple, int]) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML; list items by index."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value, e.g. --set calibration.samples=32")
    key_path, raw_value = assignment.split("=", 1)
    keys = [int(k) if k.isdigit() else k for k in key_path.strip().split(".")]
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {error}") from None
    target = data
    for depth, key in enumerate(keys[:-1]):
        if isinstance(target, list):
            if not isinstance(key, int) or key >= len(target):
                raise ConfigError(f"--set {key_path}: {'.'.join(map(str, keys[:depth]))} has {len(target)} items; no item {key}")
            target = target[key]
        else:
            target = target.setdefault(key, {})
        if not isinstance(target, dict | list):
            raise ConfigError(f"--set {key_path}: {'.'.join(map(str, keys[: depth + 1]))} is a value, not a section")
    last = keys[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            raise ConfigError(f"--set {key_path}: no item {last} in a list of {len(target)}")
    target[last] = value
    lines[tuple(keys)] = 0


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names of the pydantic model found at `loc` (None where it is not a model)."""
    current: Any = model
    for key in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(key) if isinstance(key, str) else None
            if field is None:
                return None
            current = field.annotation
        elif getattr(current, "__origin__", None) is dict:
            current = current.__args__[1]
        else:
            current = next((a for a in getattr(current, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if current is None:
                return None
            if isinstance(key, str):
                field = current.model_fields.get(key)
                if field is None:
                    return None
                current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [name for name, field in current.model_fields.items() if not field.exclude]
    inner = next((a for a in getattr(current, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return None if inner is None else [name for name, f in inner.model_fields.items() if not f.exclude]


def format_validation_error(
    error: ValidationError, model: type[BaseModel], source: str, lines: dict[tuple, int], prefix: tuple = ()
) -> str:
    """One line per problem: where, which key, what is wrong, and what is allowed."""
    messages = []
    for item in error.errors():
        loc = prefix + tuple(item["loc"])
        key = ".".join(str(k) for k in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, tuple(item["loc"])[:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            text = f"unknown key {loc[-1]!r}{hint}"
        elif item["type"] == "missing":
            text = "required key is missing"
        else:
            text = item["msg"].replace("Value error, ", "")
            if "input" in item and not isinstance(item["input"], dict | list):
                text += f" (got {item['input']!r})"
        messages.append(f"{_where(source, lines, loc)}: {key}: {text}")
    return "\n".join(messages)


def load_config(path: str | Path, overrides: list[str] = ()) -> SlimcConfig:
    """Read, override, migrate and validate a config file."""
    path = Path(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping with keys such as version, model, pipeline")
    for assignment in overrides:
        apply_override(data, assignment, lines)
    return config_from_data(data, source=str(path), lines=lines)


def settings_config(overrides: list[str] = ()) -> SlimcConfig:
    """A config of defaults with `--set` overrides only (no file)."""
    data: dict = {}
    lines: dict[tuple, int] = {}
    for assignment in overrides:
        apply_override(data, assignment, lines)
    return config_from_data(data, source="command line", lines=lines)


def with_evaluation(config: SlimcConfig, **settings: Any) -> SlimcConfig:
    """The config with evaluation settings replaced by those given (None keeps the config's), validated."""
    given = {key: value for key, value in settings.items() if value is not None}
    try:
        evaluation = EvaluationConfig.model_validate({**config.evaluation.model_dump(), **given})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, SlimcConfig, "command line", {}, prefix=("evaluation",))) from None
    return config.model_copy(update={"evaluation": evaluation})


def config_from_data(data: dict, *, source: str = "<config>", lines: dict[tuple, int] | None = None) -> SlimcConfig:
    lines = dict(lines or {})
    data = copy.deepcopy(data)
    written_for = data.get("version", CONFIG_VERSION)
    changes = upgrade(data, lines, source=_where(source, lines, ("version",)))
    if changes:
        warnings.warn(f"{source}: a version {written_for} config, upgraded in memory ({'; '.join(changes)}); "
                      f"`slimc migrate {source}` prints the upgraded file", UserWarning, stacklevel=2)
    try:
        written = _WrittenConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, SlimcConfig, source, lines)) from None
    config = SlimcConfig(**{**dict(written), "pipeline": []})
    config.source_file = source
    config.lines = lines
    for index, step in enumerate(written.pipeline):
        if "pass" not in step:
            raise ConfigError(f"{config.where('pipeline', index)}: pipeline.{index}: each step needs `pass: NAME`")
    for index, step in enumerate(config.export):
        if "format" not in step:
            raise ConfigError(f"{config.where('export', index)}: export.{index}: each entry needs `format: NAME`")
    config.pipeline = typed_pipeline(written.pipeline, config)
    check_tune(config)
    return config


def check_tune(config: SlimcConfig) -> None:
    """Each fallback names a scheme under `schemes:` or float, once."""
    if config.tune is None:
        return
    for index, name in enumerate(config.tune.fallback):
        where = f"{config.where('tune', 'fallback', index)}: tune.fallback.{index}"
        if name != FLOAT and name not in config.schemes:
            known = ", ".join([*sorted(config.schemes), FLOAT])
            raise ConfigError(f"{where}: unknown scheme {name!r}; a fallback is a scheme under `schemes:` or "
                              f"{FLOAT!r} (known: {known})")
        if name in config.tune.fallback[:index]:
            raise ConfigError(f"{where}: {name!r} is listed twice; each fallback is tried once, in order")


def typed_pipeline(written: list[dict[str, Any]], config: SlimcConfig) -> list[PassStep]:
    """Each step as its pass class, its parameters validated, in an order every step's declarations allow."""
    steps: list[PassStep] = []
    for index, raw in enumerate(written):
        try:
            step_class = pass_class(str(raw["pass"]))
        except ConfigError as error:
            raise ConfigError(f"{config.where('pipeline', index, 'pass')}: pipeline.{index}.pass: {error}") from None
        try:
            steps.append(step_class(**{key: value for key, value in raw.items() if key != "pass"}))
        except ValidationError as error:
            raise ConfigError(
                format_validation_error(error, step_class, config.source_file, config.lines, prefix=("pipeline", index))
            ) from None
        check_order(steps, index, config)
        steps[index].check(config, index)
    return steps
