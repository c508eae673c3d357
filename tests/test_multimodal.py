"""Vision–language models compile with their shipped configs, and the Ascend files reproduce the result.

One tiny model per class (tests/tiny_multimodal.py), saved like a real checkpoint, is compiled once per
module with its shipped W8A8 config and a small built-in image–text calibration; the tests then read
the Ascend output back with the format's own reader.
"""

from __future__ import annotations

import filecmp
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from compile_settings import MULTIMODAL_CONFIGS, MULTIMODAL_SMALL
from module_calls import module_calls
from programs import cosine, relative, rounding_bound
from safetensors import safe_open
from tiny_multimodal import GRID, MERGE, media_tokens, processor_inputs, save_tiny_multimodal
from transformers import AutoImageProcessor, AutoTokenizer

from slimc.backends.mindie_reader import load_ascend_model
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import Compiled, compile_model
from slimc.commands.explain import trace_report
from slimc.config import config_from_data, load_config
from slimc.errors import DataError
from slimc.frontends.media import load_image_text
from slimc.frontends.multimodal import ComposedProcessor, MultimodalLLM, chat_template
from slimc.ir.source import resolve_model_source, write_model_files
from slimc.pass_base import Pass
from slimc.passes.fake_quant import Rule
from slimc.pipeline import Context, Pipeline
from slimc.report import RunReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@dataclass
class Output:
    kind: str
    model_dir: Path
    out: Path
    compiled: Compiled


@pytest.fixture(scope="module", params=[(kind, dtype) for kind in sorted(MULTIMODAL_CONFIGS) for dtype in ("float32", "bfloat16")],
                ids="-".join)
def output(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Output:
    """A tiny model of one class, saved in float32 or bfloat16, compiled with its shipped config; treat as read-only."""
    kind, dtype = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{dtype}")
    model_dir = save_tiny_multimodal(kind, root / "model", dtype=getattr(torch, dtype))
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS[kind]), MULTIMODAL_SMALL)
    compiled = compile_model(config, model_path=str(model_dir), out_dir=root / "out")
    assert compiled.program.dtype == getattr(torch, dtype)
    return Output(kind, model_dir, root / "out" / "mindie", compiled)


def fresh_batches(output: Output) -> list[dict]:
    """Held-out image–text batches (builtin:image-text-eval) shaped like the calibration batches."""
    calibration = load_config(resolve_config_path(MULTIMODAL_CONFIGS[output.kind]), MULTIMODAL_SMALL).calibration
    held_out = calibration.model_copy(update={"dataset": "builtin:image-text-eval", "samples": 4})
    program = output.compiled.program
    return MultimodalLLM().calibration_batches(held_out, program.source, program)


@torch.no_grad()
def test_the_ascend_files_reproduce_the_fake_quant_program_on_fresh_images(output: Output) -> None:
    program = output.compiled.program
    from_files = load_ascend_model(output.out)
    for batch in fresh_batches(output):
        with program.executing_graphs():
            expected = program.model(**batch, use_cache=False).logits
        actual = from_files(**batch, use_cache=False).logits
        assert relative(actual, expected) < rounding_bound(program, batch, 1e-2)  # static W8A8 rounds bias / deq_scale to integers


@torch.no_grad()
def test_w8a8_output_stays_close_to_the_float_model(output: Output) -> None:
    float_model = type(output.compiled.program.model).from_pretrained(output.model_dir, experts_implementation="batched_mm").eval()
    from_files = load_ascend_model(output.out)
    for batch in fresh_batches(output):
        reference = float_model(**batch, use_cache=False).logits
        actual = from_files(**batch, use_cache=False).logits
        assert cosine(actual, reference) >= 0.99


def test_layer_policy_vision_and_text_quantized_mergers_routers_head_float(output: Output) -> None:
    specs = output.compiled.program.quant_specs
    assert specs["model.visual.blocks.0.attn.qkv"].scheme_name == "w8a8_dynamic"
    assert specs["model.language_model.layers.1.self_attn.q_proj"].scheme_name == "w8a8_static"
    assert not any("merger" in name or name.endswith(("mlp.gate", "lm_head", "embed_tokens")) for name in specs)
    if output.kind in ("qwen3_vl_moe", "glm4v_moe"):
        assert specs["model.language_model.layers.1.mlp.experts"].scheme_name == "w8a8_dynamic"
    types = json.loads((output.out / "quant_model_description.json").read_text())
    floats = [name for name, kind in types.items() if kind == "FLOAT"]
    assert any("patch_embed" in name for name in floats) and any("merger" in name for name in floats)


def expected_names(kind: str, source: set[str], shapes: dict[str, tuple]) -> set[str]:
    """The source checkpoint's tensor names, fused experts named per expert (the Ascend layout describes Linears)."""
    names = set()
    for name in source:
        prefix, _, which = name.rpartition(".")
        if prefix.endswith("mlp.experts") and which in ("gate_up_proj", "down_proj"):
            parts = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
            names |= {f"{prefix}.{e}.{part}.weight" for e in range(shapes[name][0]) for part in parts}
        else:
            names.add(name)
    return names


def test_written_tensor_names_are_the_source_checkpoints_own(output: Output) -> None:
    with safe_open(output.model_dir / "model.safetensors", "pt") as f:
        source = set(f.keys())
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in source}
    with safe_open(output.out / "quant_model_weights.safetensors", "pt") as f:
        written = set(f.keys())
    weights = {n for n in written if n.endswith((".weight", ".bias")) or n in source}
    assert weights == expected_names(output.kind, source, shapes)
    if output.kind == "qwen2_5_vl":  # legacy layout: visual.* and model.layers.*
        assert "visual.blocks.0.attn.qkv.weight" in written and "model.layers.0.self_attn.q_proj.weight" in written
    else:
        assert "model.visual.blocks.0.attn.qkv.weight" in written
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in written


def test_processor_tokenizer_and_chat_template_files_are_copied(output: Output) -> None:
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert filecmp.cmp(output.model_dir / name, output.out / name, shallow=False), name
    assert not (output.out / "model.safetensors").exists()


def test_every_checkpoint_file_but_weights_and_config_is_copied(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    extra = {"preprocessor_config.json": "{}", "video_preprocessor_config.json": "{}", "chat_template.json": "{}",
             "README.md": "# model card", "model.safetensors.index.json": json.dumps(
                 {"metadata": {}, "weight_map": {"lm_head.weight": "model.safetensors"}})}
    for name, text in extra.items():
        (model_dir / name).write_text(text)
    written = {p.name for p in write_model_files(resolve_model_source(model_dir), tmp_path / "out")}
    shipped = {p.name for p in model_dir.iterdir()} - {"model.safetensors", "model.safetensors.index.json"}
    assert written == shipped
    for name in shipped - {"config.json"}:
        assert filecmp.cmp(model_dir / name, tmp_path / "out" / name, shallow=False), name


def test_a_rule_can_quantize_the_mergers(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen3_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen3_vl"]), MULTIMODAL_SMALL)
    config.pipeline[1].rules.append(Rule(scheme="w8a8_dynamic", include=["*visual.merger.*", "*visual.deepstack_merger_list.*"]))
    compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    mergers = sorted(name for name in compiled.program.quant_specs if "merger" in name)
    assert mergers == [f"model.visual.{m}.linear_fc{i}" for m in ("deepstack_merger_list.0", "deepstack_merger_list.1",
                                                                   "merger") for i in (1, 2)]
    output = Output("qwen3_vl", model_dir, tmp_path / "out" / "mindie", compiled)
    from_files = load_ascend_model(output.out)
    with torch.no_grad():
        for batch in fresh_batches(output):
            with compiled.program.executing_graphs():
                expected = compiled.program.model(**batch, use_cache=False).logits
            assert relative(from_files(**batch, use_cache=False).logits, expected) < 1e-2


# ------------------------------------------------------------------------------------- structure and capture


class RecordInputs(Pass):
    """Keeps the hidden states each block was calibrated on."""

    seen: dict = {}

    def run_block(self, block, ctx: Context) -> None:
        self.seen[block.name] = [args[0] if args else kwargs["hidden_states"] for args, kwargs in ctx.inputs]


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_blocks_are_calibrated_on_the_inputs_the_quantized_model_gives_them(tmp_path: Path, kind: str) -> None:
    """Qwen2.5-VL's windowed and full-attention blocks get their own attention spans; Qwen3-VL's decoder
    layers get the deepstack features the model adds to image tokens, computed by the quantized tower."""
    model_dir = save_tiny_multimodal(kind, tmp_path / "model")
    source = resolve_model_source(model_dir)
    frontend = MultimodalLLM()
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    assert [stage.name for stage in program.stages] == ["vision", "projector", "text"]
    config = config_from_data({
        "calibration": {"dataset": "builtin:image-text", "samples": 4, "batch_size": 2, "image_size": 56, "seq_len": 64},
        "schemes": {"w8a8": {"weight": {"dtype": "int8", "granularity": "per_channel"},
                             "act": {"dtype": "int8", "granularity": "per_token", "dynamic": True}}},
        "pipeline": [{"pass": "fake_quant", "rules": [{"scheme": "w8a8", "include": ["*blocks*", "*layers*"]}]},
                     {"pass": "calibrate"}],
    })
    batches = frontend.calibration_batches(config.calibration, source, program)
    recorder = RecordInputs(seen={})
    Pipeline([*Pipeline.from_config(config).steps, recorder]).run(program, config, batches, RunReport())
    with program.executing_graphs():  # the blocks' rewritten graphs run in the model
        calls = module_calls([(block.name, block.container[block.index]) for block in program.blocks],
                             lambda: [program.call(program.model, batch) for batch in batches])
    given: dict[str, list[torch.Tensor]] = {}
    for name, args, kwargs, _ in calls:
        given.setdefault(name, []).append(args[0] if args else kwargs["hidden_states"])
    assert set(recorder.seen) == {block.name for block in program.blocks}
    for name, calibrated in recorder.seen.items():
        assert len(calibrated) == len(given[name]) == len(batches), name
        for actual, expected in zip(calibrated, given[name]):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "qwen3_vl":  # deepstack mergers run between the vision blocks, before the final merger
        assert [block.name for block in program.stages[1].blocks] == [
            "model.visual.deepstack_merger_list.0", "model.visual.deepstack_merger_list.1", "model.visual.merger"]


def test_batches_hold_one_image_per_sample_in_equal_unpadded_rows(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("glm4v_moe", tmp_path / "model")
    source = resolve_model_source(model_dir)
    frontend = MultimodalLLM()
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    calibration = load_config(resolve_config_path(MULTIMODAL_CONFIGS["glm4v_moe"]), [*MULTIMODAL_SMALL, "calibration.samples=5",
                                                                         "calibration.seq_len=40"]).calibration
    report = RunReport()
    batches = frontend.calibration_batches(calibration, source, program, report)
    assert len(batches) == 2 and "the last 1 samples (an incomplete batch) were dropped" in report.notes[0]
    per_image = GRID * GRID // MERGE**2
    for batch in batches:
        ids = batch["input_ids"]
        assert ids.shape[0] == 2 and ids.shape[1] <= 40 and bool(batch["attention_mask"].all())
        assert batch["image_grid_thw"].tolist() == [[1, GRID, GRID]] * 2
        assert ((ids == source.config.image_token_id).sum(1) == per_image).all()
        assert torch.equal(batch["mm_token_type_ids"], (ids == source.config.image_token_id).long())


def test_slimc_trace_shows_the_three_stages(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen3_vl_moe", tmp_path / "model")
    text = trace_report(str(model_dir))
    assert "stages vision (2), projector (3), text (2)" in text
    assert "block model.visual.deepstack_merger_list.0 [projector]" in text
    assert "experts          mlp.experts: 4 experts" in text


# --------------------------------------------------------------------------------------------- processors


def _prompt_and_image(kind: str) -> tuple[list[dict], object]:
    sample = load_image_text("builtin:image-text", samples=1, image_size=90)[0]
    return MultimodalLLM().messages(sample), sample.image


@pytest.mark.parametrize("kind", sorted(MULTIMODAL_CONFIGS))
def test_composed_processor_gives_what_the_processor_gives(tmp_path: Path, kind: str) -> None:
    """`processor_inputs` is the test suite's reference, checked bit-equal to the real processors where
    torchvision is installed (tests/test_tiny_multimodal.py)."""
    model_dir = save_tiny_multimodal(kind, tmp_path / "model")
    source = resolve_model_source(model_dir)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir)
    composed = ComposedProcessor(tokenizer, image_processor, source.config, chat_template(model_dir, tokenizer))
    messages, image = _prompt_and_image(kind)
    text = composed.apply_chat_template(messages, tokenize=False)
    assert text.count(media_tokens(kind)["image_token"]) == 1
    got = composed(text=[text, text + "more"], images=[image, image])
    expected = processor_inputs(kind, tokenizer, image_processor, [text, text + "more"], [image, image])
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert int((got["input_ids"][0] == source.config.image_token_id).sum()) == GRID * GRID // MERGE**2


# ------------------------------------------------------------------------------------------------ data errors


def test_text_only_data_for_a_config_that_quantizes_the_vision_tower_is_an_error(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]),
                         ["calibration.dataset=builtin:text", "calibration.samples=2", "calibration.seq_len=16",
                          "calibration.batch_size=2"])
    with pytest.warns(UserWarning, match="below the recommended"), \
            pytest.raises(DataError, match=r"no input to stage 'vision'.*quantizes 20 of its layers.*builtin:image-text"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_only_data_calibrates_the_decoder_when_the_vision_tower_stays_float(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]),
                         ["calibration.dataset=builtin:text", "calibration.samples=2", "calibration.seq_len=16",
                          "calibration.batch_size=2", "pipeline.1.rules.0.exclude=['*']"])
    with pytest.warns(UserWarning, match="below the recommended"):
        compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    specs = compiled.program.quant_specs
    assert specs and all(name.startswith("model.language_model.") for name in specs)
    assert any("stage 'vision': no calibration batch runs it" in note for note in compiled.report.notes)


@pytest.mark.parametrize(("line", "message"), [
    ('{"image": "missing.png", "text": "hi"}', r"line 2: image .*missing.png does not exist"),
    ('{"image": "a.png", "text": "hi"', r"line 2: not valid JSON"),
    ('{"text": "no image"}', r"line 2: has no \"image\" field"),
])
def test_bad_image_text_lines_are_named_with_their_line(tmp_path: Path, line: str, message: str) -> None:
    load_image_text("builtin:image-text", samples=1, image_size=32)[0].image.save(tmp_path / "a.png")
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "text": "Describe it."}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_image_text(str(data), samples=2, image_size=32)


@torch.no_grad()
def test_online_rotations_are_written_under_checkpoint_names(tmp_path: Path) -> None:
    """Qwen2.5-VL's checkpoint names its text layers `model.layers.*` (the runtime says
    `model.language_model.layers.*`): rotation tensors must follow the checkpoint, and read back."""
    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]), [
        *MULTIMODAL_SMALL, "calibration.samples=4",
        'pipeline=[{pass: rotate_inputs, include: ["*language_model.layers.*.mlp.down_proj"]},'
        ' {pass: fake_quant, rules: [{scheme: w8a8_dynamic, include: ["*language_model.layers.*"]}]},'
        ' {pass: calibrate}, {pass: lower}]',
    ])
    compiled = compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
    description = json.loads((tmp_path / "out" / "mindie" / "quant_model_description.json").read_text())
    assert description["metadata"]["quarot"]["kronecker_rotation"]["layers"] == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    program = compiled.program
    output = Output("qwen2_5_vl", model_dir, tmp_path / "out" / "mindie", compiled)
    from_files = load_ascend_model(output.out)
    for batch in fresh_batches(output)[:1]:
        with program.executing_graphs():
            expected = program.model(**batch, use_cache=False).logits
        assert relative(from_files(**batch, use_cache=False).logits, expected) < 1e-4


def test_model_ready_batches_from_safetensors_calibrate_the_vision_tower(tmp_path: Path) -> None:
    """Batches already run through the processor, saved as `<batch>.<argument>` tensors, are used as stored."""
    from safetensors.torch import save_file

    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]), MULTIMODAL_SMALL)
    source = resolve_model_source(model_dir)
    frontend = MultimodalLLM()
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    batches = frontend.calibration_batches(config.calibration, source, program)
    save_file({f"{i}.{key}": value.contiguous() for i, batch in enumerate(batches) for key, value in batch.items()},
              tmp_path / "batches.safetensors")
    ready = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]), [*MULTIMODAL_SMALL, f"calibration.dataset={tmp_path / 'batches.safetensors'}"])
    assert [sorted(b) for b in frontend.calibration_batches(ready.calibration, source, program)] == [sorted(b) for b in batches]
    compiled = compile_model(ready, model_path=str(model_dir), out_dir=tmp_path / "out")
    assert any(name.startswith("model.visual.blocks.") for name in compiled.program.quant_specs)
    assert any("model-ready batches" in note for note in compiled.report.notes)


def test_a_missing_model_ready_batches_file_names_the_layout(tmp_path: Path) -> None:
    model_dir = save_tiny_multimodal("qwen2_5_vl", tmp_path / "model")
    config = load_config(resolve_config_path(MULTIMODAL_CONFIGS["qwen2_5_vl"]), [*MULTIMODAL_SMALL, f"calibration.dataset={tmp_path / 'none.safetensors'}"])
    with pytest.raises(DataError, match="model-ready batches .tensors named '<batch>.<argument>'"):
        compile_model(config, model_path=str(model_dir), out_dir=tmp_path / "out")
