"""Vision–language models: Qwen2.5-VL, Qwen3-VL (dense and MoE), GLM-4.6V.

A model is cut into stages in the order one forward runs them, each found from the structure and the
config rather than from module names:

- `vision`: the vision tower's repeated blocks. The tower is the module built from
  `config.vision_config`; its blocks are the list of `vision_config.depth` modules of one class that
  keep the tower's width (a Linear reads `hidden_size` features, one writes them), which tells them
  from lists of mergers of the same length (Qwen3-VL's deepstack mergers).
- `projector`: the tower's other modules that hold Linears, one block each: the vision–language
  mergers. Mergers kept in lists (deepstack mergers, which run between vision blocks) come first,
  then the final merger. Configs choose by glob whether to quantize them.
- `text`: the decoder layers, the list of `text_config.num_hidden_layers` modules inside the text
  model (the module owning `get_input_embeddings()`). frontends/llm.py's first-list-of-that-length
  rule would pick a vision list whenever the depths coincide.

Inputs between stages (image features scattered into the text embeddings, Qwen3-VL's deepstack
features added after early text layers, per-block windowed attention lengths) are carried by the
core's stage capture. Every calibration batch runs the model the same way (`use_cache=False`), with
`batch_size` samples of one image each, all images of one size, and rows of equal length.

Subclasses (omni thinkers) add encoder stages by overriding `encoder_stages`, and their own media by
overriding `messages`, `processor` and `media_samples`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoProcessor, PretrainedConfig
from transformers.utils import is_torchvision_available

from slimc.config import CalibrationConfig
from slimc.errors import DataError, ModelLoadError
from slimc.frontends.audio import holds_audio
from slimc.frontends.base import Frontend
from slimc.frontends.data import BUILTIN_SPECS
from slimc.frontends.diffusion_data import load_recorded_calls
from slimc.frontends.llm import call_without_cache, text_batches
from slimc.frontends.media import IMAGE_TEXT_SPECS, ImageText, is_text_only, load_image_text
from slimc.ir import Block, Program, Stage
from slimc.ir.source import ModelSource, load_model, load_tokenizer
from slimc.report import RunReport

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # per-token processor outputs, (1, L) per sample


class MultimodalLLM(Frontend):
    name = "multimodal"
    architectures = (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "Glm4vMoeForConditionalGeneration",
    )
    description = "vision-language models: vision tower, projector, text decoder"
    evaluation_dataset = "builtin:image-text-eval"
    evaluation_metric = "fidelity"
    calibration_dataset = "builtin:image-text"
    builtin_datasets = (*BUILTIN_SPECS, *IMAGE_TEXT_SPECS)  # text-only data calibrates the decoder alone
    trace_calibration = {"seq_len": 32, "image_size": 64}  # 64 px: the fewest image tokens processors allow

    def load(self, source: ModelSource, *, dtype: torch.dtype, device: str | dict[str, str] = "cpu",
             trust_remote_code: bool = False, offload_folder: Path | None = None) -> nn.Module:
        # batched_mm: fused MoE experts that fx can trace (the default grouped_mm cannot); dense models ignore it.
        return load_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                          experts_implementation="batched_mm",
                          **({"offload_folder": str(offload_folder)} if offload_folder is not None else {}))

    def build(self, source: ModelSource, model: nn.Module) -> Program:
        stages = [stage for stage in (*self.encoder_stages(model), text_stage(model)) if stage.blocks]
        return Program(model=model, family=self.name, source=source, stages=stages, call=call_without_cache)

    def encoder_stages(self, model: nn.Module) -> list[Stage]:
        """The stages before the text decoder, in forward order: the vision blocks, then the mergers."""
        vision_config = model.config.vision_config
        tower_name, tower = tower_of(model, vision_config)
        blocks_name, blocks = width_keeping_list(tower, vision_config.depth, vision_config.hidden_size, tower_name)
        vision = [Block(f"{tower_name}.{blocks_name}.{i}", b, blocks, i, role="vision") for i, b in enumerate(blocks)]
        return [Stage("vision", vision), Stage("projector", projector_blocks(tower, tower_name, blocks))]

    # ---------------------------------------------------------------------------------- calibration data

    def calibration_batches(self, calibration: CalibrationConfig, source: ModelSource, program: Program,
                            report: RunReport | None = None) -> list[dict]:
        """Text-only data gives `{"input_ids"}` batches (the vision stages then get none); image–text data
        gives the processor's outputs, `batch_size` samples of one image each, rows of one length."""
        if (batches := model_ready_batches(calibration, report)) is not None:
            return batches
        if holds_audio(calibration.dataset):  # the omni frontend reads audio; these models have no audio encoder
            raise DataError(f"{calibration.dataset} holds audio, but {type(program.model).__name__} has no audio encoder; "
                            "use image–text data (builtin:image-text, or a .jsonl of {\"image\", \"text\"} lines)")
        if is_text_only(calibration.dataset):
            if report is not None:
                report.note(f"calibration: {calibration.dataset} is text only; the vision tower gets no calibration "
                            "batch (a config that quantizes it needs image–text data)")
            return [{"input_ids": ids} for ids in text_batches(calibration, load_tokenizer(source), report)]
        samples = self.media_samples(calibration)
        if len(samples) < calibration.batch_size:
            raise DataError(f"{calibration.dataset} gave {len(samples)} samples, fewer than one batch of "
                            f"calibration.batch_size={calibration.batch_size}; add samples or lower batch_size")
        processor = self.processor(source, program.model)
        rows = [self.encode(processor, sample, calibration.seq_len, program.model.config) for sample in samples]
        return batch_rows(rows, calibration, report)

    def media_samples(self, calibration: CalibrationConfig) -> list[ImageText]:
        """The dataset's samples (`calibration.samples` of them at most), images already resized."""
        return load_image_text(calibration.dataset, samples=calibration.samples, image_size=calibration.image_size)

    def messages(self, sample: ImageText) -> list[dict]:
        """The chat of one sample: the user shows the image and asks; the assistant's answer if there is one."""
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.text}]}]
        if sample.response is not None:
            chat.append({"role": "assistant", "content": sample.response})
        return chat

    def processor(self, source: ModelSource, model: nn.Module) -> Any:
        """The checkpoint's processor; where transformers cannot build it without torchvision, one composed
        from the tokenizer and image processor that do load (`ComposedProcessor`)."""
        try:
            return AutoProcessor.from_pretrained(source.path)
        except ImportError as error:
            if is_torchvision_available():
                raise ModelLoadError(f"could not load the processor from {source.path}: {error}") from None
        except (OSError, ValueError, TypeError) as error:
            raise ModelLoadError(f"could not load the processor from {source.path}: {str(error).splitlines()[0]}; "
                                 "copy the model's processor files (processor_config.json or preprocessor_config.json, "
                                 "tokenizer files, chat template)") from None
        try:
            image_processor = AutoImageProcessor.from_pretrained(source.path)
        except (OSError, ValueError, ImportError) as error:
            raise ModelLoadError(f"could not load the image processor from {source.path}: {str(error).splitlines()[0]}; "
                                 "copy the model's preprocessor_config.json or processor_config.json") from None
        tokenizer = load_tokenizer(source)
        return ComposedProcessor(tokenizer, image_processor, model.config, chat_template(source.path, tokenizer),
                                 token_types=accepts(model, "mm_token_type_ids"))

    def encode(self, processor: Any, sample: ImageText, seq_len: int, config: PretrainedConfig) -> dict[str, torch.Tensor]:
        """One sample as processor outputs, cut to `seq_len` tokens (never inside its image tokens)."""
        add_prompt = sample.response is None
        text = processor.apply_chat_template(self.messages(sample), tokenize=False, add_generation_prompt=add_prompt)
        row = dict(processor(text=[text], images=[sample.image], return_tensors="pt"))
        image_positions = torch.nonzero(row["input_ids"][0] == config.image_token_id).flatten()
        if len(image_positions) == 0:
            raise DataError("the chat template put no image token in the prompt; check the model's chat template")
        needed = int(image_positions[-1]) + 1
        if needed > seq_len:
            raise DataError(f"seq_len {seq_len} is shorter than a sample's prompt up to its last image token ({needed} tokens "
                            f"at image_size {sample.image.width}); raise seq_len (calibration.seq_len, or --seq-len of "
                            "slimc trace) or lower calibration.image_size")
        return {k: (v[:, :seq_len] if k in SEQUENCE_KEYS else v) for k, v in row.items() if isinstance(v, torch.Tensor)}


def text_stage(model: nn.Module) -> Stage:
    """The decoder layers: `num_hidden_layers` modules of one class inside the module owning the input embeddings."""
    embeddings = model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    text_model_name = names[id(embeddings)].rpartition(".")[0]
    text_model = model.get_submodule(text_model_name)
    count = model.config.get_text_config().num_hidden_layers
    for name, module in text_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1:
            prefix = f"{text_model_name}.{name}" if text_model_name else name
            return Stage("text", [Block(f"{prefix}.{i}", layer, module, i, role="text") for i, layer in enumerate(module)])
    raise ModelLoadError(f"{type(model).__name__}: found no list of {count} decoder layers in {text_model_name or 'the model'}")


def tower_of(model: nn.Module, sub_config: PretrainedConfig) -> tuple[str, nn.Module]:
    """The outermost module built from `sub_config` (the vision tower from `config.vision_config`)."""
    for name, module in model.named_modules():
        if getattr(module, "config", None) is sub_config:
            return name, module
    for name, module in model.named_modules():  # a copy of the sub-config
        config = getattr(module, "config", None)
        if type(config) is type(sub_config) and config.to_dict() == sub_config.to_dict():
            return name, module
    raise ModelLoadError(f"{type(model).__name__}: found no module built from its {type(sub_config).__name__}")


def width_keeping_list(tower: nn.Module, count: int, width: int, tower_name: str = "") -> tuple[str, nn.ModuleList]:
    """The tower's list of `count` same-class modules that keep its width: each holds a Linear reading `width`
    features and one writing them (residual blocks; mergers change the width)."""
    found = []
    for name, module in tower.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count or len({type(m) for m in module}) != 1:
            continue
        linears = [m for m in module[0].modules() if isinstance(m, nn.Linear)]
        if any(m.in_features == width for m in linears) and any(m.out_features == width for m in linears):
            found.append((name, module))
    if len(found) != 1:
        what = ", ".join(name for name, _ in found) or "none"
        raise ModelLoadError(f"{tower_name or type(tower).__name__}: expected one list of {count} blocks of width {width}, "
                             f"found {what}")
    return found[0]


def projector_blocks(tower: nn.Module, tower_name: str, blocks: nn.ModuleList) -> list[Block]:
    """The tower's modules outside `blocks` holding Linears (its mergers), as one-block units: items of lists
    (which run between the blocks) first, then the others (which run after them)."""
    listed, single = [], []
    for name, child in tower.named_children():
        if child is blocks:
            continue
        if isinstance(child, nn.ModuleList):
            listed += [Block(f"{tower_name}.{name}.{i}", item, child, i, role="projector")
                       for i, item in enumerate(child) if _holds_linear(item)]
        elif _holds_linear(child):
            single.append(Block(f"{tower_name}.{name}", child, _Holder(tower, name), 0, role="projector"))
    return listed + single


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


class _Holder:
    """Stands in for a ModuleList for a block that is a plain attribute of its parent (a tower's merger):
    `holder[0] = graph` swaps the attribute, as `Program.executing_graphs` does with list items."""

    def __init__(self, parent: nn.Module, attribute: str) -> None:
        self.parent, self.attribute = parent, attribute

    def __getitem__(self, index: int) -> nn.Module:
        return getattr(self.parent, self.attribute)

    def __setitem__(self, index: int, module: nn.Module) -> None:
        setattr(self.parent, self.attribute, module)


def accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def chat_template(path: Path, tokenizer: Any) -> str:
    """The processor's chat template (chat_template.jinja, chat_template.json, processor_config.json), else the tokenizer's."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        if (path / name).is_file():
            template = json.loads((path / name).read_text(encoding="utf-8")).get("chat_template")
            if isinstance(template, str):
                return template
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise ModelLoadError(f"{path} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json); "
                         "copy the model's chat template")


class ComposedProcessor:
    """What a vision–language processor returns, from its tokenizer and image processor alone.

    transformers 5 builds none of these processors without torchvision (each takes a video processor).
    The output is the processor's: the image processor's `pixel_values` and `image_grid_thw`; the text
    with each image token repeated once per merged patch (`grid_thw.prod() // spatial_merge_size²`),
    tokenized; `mm_token_type_ids` (1 at image tokens) where the model takes it.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, config: PretrainedConfig, template: str, *,
                 token_types: bool = True) -> None:
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.image_token_id = config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        self.merge = config.vision_config.spatial_merge_size
        self.token_types = token_types

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)

    def __call__(self, *, text: list[str], images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        vision = self.image_processor(images=images, return_tensors=return_tensors)
        counts = iter((vision["image_grid_thw"].prod(-1) // self.merge**2).tolist())
        expanded = []
        for t in text:
            pieces = t.split(self.image_token)
            expanded.append(pieces[0] + "".join(self.image_token * next(counts) + piece for piece in pieces[1:]))
        encoded = self.tokenizer(expanded, return_tensors=return_tensors, padding=True)
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
               "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        if self.token_types:
            out["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).long()
        return out


def batch_rows(rows: list[dict[str, torch.Tensor]], calibration: CalibrationConfig, report: RunReport | None) -> list[dict]:
    """Samples into batches of `batch_size`, concatenated as the processor would batch them, without padding.

    Padded positions would enter activation ranges, and a traced decoder layer is specialised to having a
    padding mask or not; so samples are grouped by length and each batch's rows are cut to its shortest
    (after the image tokens, which sit at the same place in every row). An incomplete last batch is dropped.
    """
    size = calibration.batch_size
    used = len(rows) // size * size
    order = sorted(range(used), key=lambda i: rows[i]["input_ids"].shape[1])
    batches, kept, total = [], 0, 0
    for start in range(0, used, size):
        group = [rows[i] for i in order[start:start + size]]
        length = min(row["input_ids"].shape[1] for row in group)
        batch = {}
        for key in group[0]:
            parts = [row[key][:, :length] if key in SEQUENCE_KEYS else row[key] for row in group]
            batch[key] = torch.cat(parts)
        batches.append(batch)
        kept += length * size
        total += sum(row["input_ids"].shape[1] for row in group)
    if report is not None:
        report.metrics["calibration_tokens"] = float(kept)
        dropped = f"; the last {len(rows) - used} samples (an incomplete batch) were dropped" if used < len(rows) else ""
        report.note(f"calibration: {used} image–text samples of {calibration.dataset} in {len(batches)} batches of {size}, "
                    f"images {calibration.image_size}px square, {kept} tokens ({total - kept} cut to equalise rows){dropped}")
    return batches


def model_ready_batches(calibration: CalibrationConfig, report: RunReport | None = None) -> list[dict] | None:
    """A `.safetensors` dataset of batches already run through the processor, as the model takes them:
    tensors named `<batch>.<argument>` (`0.input_ids`, `0.pixel_values`, `0.image_grid_thw`, ...), each
    batch used as stored; None for any other dataset."""
    if not calibration.dataset.endswith(".safetensors"):
        return None
    path = Path(calibration.dataset).expanduser()
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist; give a .safetensors file of model-ready batches "
                        "(tensors named '<batch>.<argument>', e.g. '0.input_ids', '0.pixel_values'), a .jsonl of "
                        "{\"image\", \"text\"} lines, or builtin:image-text")
    batches = [call.kwargs for call in load_recorded_calls(path)]
    if report is not None:
        report.note(f"calibration: {len(batches)} model-ready batches from {path} (used as stored)")
    return batches
