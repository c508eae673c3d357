"""Omni thinkers (Qwen2.5-Omni, Qwen3-Omni) compile with their shipped configs from whole checkpoints, and the
Ascend output loads in place of the checkpoint: quantized thinker under `thinker.*`, talker and vocoder copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compile_settings import OMNI_IMAGE_SIZE, OMNI_SMALL
from programs import cosine, relative, rounding_bound
from safetensors.torch import load_file, save_file
from tiny_multimodal import TOKEN_ID, model_class, save_tiny_multimodal, tiny_multimodal_inputs
from tiny_omni import SPEAKER_FILE, save_tiny_full_omni, speech_tensors

from slimc.backends.mindie import MindieBackend
from slimc.backends.mindie_reader import load_ascend_model, read_tensors, tensor_types
from slimc.commands.cli import resolve_config_path
from slimc.commands.compile import compile_model
from slimc.config import load_config
from slimc.errors import ExportError
from slimc.frontends import frontend_for
from slimc.frontends.omni import OmniThinker
from slimc.ir.source import resolve_model_source

KINDS = ("qwen2_5_omni", "qwen3_omni_moe")


@pytest.fixture(scope="module", params=[(kind, dtype) for kind in KINDS for dtype in ("float32", "bfloat16")], ids="-".join)
def compiled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A whole tiny Omni checkpoint, thinker in float32 or bfloat16, compiled with its shipped config; treat as read-only."""
    kind, dtype = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{dtype}")
    model_dir = save_tiny_full_omni(kind, root / "model", dtype=getattr(torch, dtype))
    config = load_config(resolve_config_path(f"{kind}/w8a8.yaml"), [*OMNI_SMALL, f"calibration.image_size={OMNI_IMAGE_SIZE[kind]}"])
    result = compile_model(config, model_path=str(model_dir), out_dir=root / "out")
    assert result.program.dtype == getattr(torch, dtype)
    return {"kind": kind, "model": model_dir, "out": root / "out" / "mindie", "program": result.program,
            "dtype": getattr(torch, dtype)}


def test_ascend_files_of_a_whole_checkpoint_rebuild_the_thinker_and_reproduce_the_quantized_program(compiled):
    kind, program = compiled["kind"], compiled["program"]
    inputs = tiny_multimodal_inputs(program.model, kind, batch=2, audio=True, seed=11, pad=0)  # fresh inputs
    with torch.no_grad(), program.executing_graphs():
        expected = program.model(**inputs, use_cache=False).logits
    rebuilt = load_ascend_model(compiled["out"])
    assert type(rebuilt).__name__ == model_class(kind).__name__
    float_model = model_class(kind).from_pretrained(compiled["model"], dtype=compiled["dtype"],
                                                     experts_implementation="batched_mm").eval()
    with torch.no_grad():
        from_files = rebuilt(**inputs, use_cache=False).logits
        reference = float_model(**inputs, use_cache=False).logits
    assert relative(from_files, expected) < rounding_bound(program, inputs, 1e-2)  # static W8A8: quant_bias is rounded
    assert cosine(from_files, reference) >= 0.99


def test_layer_policy_of_the_shipped_config(compiled):
    specs = {name: spec.scheme_name for name, spec in compiled["program"].quant_specs.items()}
    assert specs["model.audio_tower.layers.1.fc2"] == "w8a8_dynamic"
    assert specs["model.visual.blocks.1.attn.proj"] == "w8a8_dynamic"
    assert specs["model.language_model.layers.1.self_attn.q_proj"] == "w8a8_static"
    if compiled["kind"] == "qwen3_omni_moe":
        assert specs["model.language_model.layers.1.mlp.experts"] == "w8a8_dynamic"
    else:
        assert specs["model.language_model.layers.1.mlp.down_proj"] == "w8a8_dynamic"
        assert specs["model.language_model.layers.1.mlp.up_proj"] == "w8a8_static"
    assert not [name for name in specs if "merger" in name or name.endswith(("mlp.gate", "lm_head"))]
    types = tensor_types(json.loads((compiled["out"] / "quant_model_description.json").read_text()))
    assert types["thinker.lm_head.weight"] == types["thinker.visual.merger.mlp.0.weight"] == "FLOAT"


def test_talker_and_vocoder_are_copied_bit_exactly_and_thinker_names_keep_their_prefix(compiled):
    kind, model_dir, out = compiled["kind"], compiled["model"], compiled["out"]
    written = read_tensors(out)
    types = tensor_types(json.loads((out / "quant_model_description.json").read_text()))
    source = {}
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        source.update(load_file(shard))
    speech = speech_tensors(kind)
    assert {n for n in written if not n.startswith("thinker.")} == set(speech)
    for name in speech:
        assert types[name] == "FLOAT"
        assert written[name].dtype == source[name].dtype
        assert torch.equal(written[name].view(torch.uint8) if written[name].ndim else written[name],
                           source[name].view(torch.uint8) if source[name].ndim else source[name])
    assert all(name.startswith("thinker.") for name in set(written) - set(speech))
    assert {name for name in source if name.startswith("thinker.")} <= set(written)  # quantized Linears keep .weight
    assert json.loads((out / "config.json").read_text()) == json.loads((model_dir / "config.json").read_text())
    if kind == "qwen2_5_omni":
        assert (out / SPEAKER_FILE).read_bytes() == (model_dir / SPEAKER_FILE).read_bytes()


def test_verify_refuses_an_output_whose_copied_tensor_changed(compiled, tmp_path):
    out = shutil.copytree(compiled["out"], tmp_path / "mindie")
    files = sorted(out.glob("quant_model_weights*.safetensors"))
    tensors = load_file(files[0])
    tensors["talker.codec_head.weight"] = tensors["talker.codec_head.weight"] + 1
    save_file(tensors, files[0], metadata={"format": "pt"})
    with pytest.raises(ExportError, match="talker.codec_head.weight .*should copy unchanged"):
        MindieBackend().verify(compiled["program"], out)


@pytest.mark.parametrize("layout", ["thinker-only", "thinking", "instruct"])
def test_thinker_only_and_whole_checkpoints_load_as_the_thinker_cut_into_four_stages(tmp_path, layout):
    kind = "qwen3_omni_moe"
    if layout == "thinker-only":
        model_dir = save_tiny_multimodal(kind, tmp_path / "model")
    else:
        model_dir = save_tiny_full_omni(kind, tmp_path / "model", talker=layout == "instruct")
    source = resolve_model_source(model_dir)
    frontend = frontend_for(source)
    assert isinstance(frontend, OmniThinker)
    program = frontend.build(source, frontend.load(source, dtype=torch.float32))
    assert type(program.model).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"
    assert [stage.name for stage in program.stages] == ["audio", "vision", "projector", "text"]
    assert [block.name for block in program.stages[0].blocks] == ["model.audio_tower.layers.0", "model.audio_tower.layers.1"]
    assert {block.role for block in program.stages[0].blocks} == {"audio"}
    copied = program.source_tensors
    assert set(copied) == (set(speech_tensors(kind)) if layout == "instruct" else set())
    assert all(Path(path).parent == model_dir for path in copied.values())


def test_a_thinker_config_without_vision_start_token_id_gets_the_tokenizers(tmp_path):
    kind = "qwen2_5_omni"
    model_dir = save_tiny_full_omni(kind, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    del config["thinker_config"]["vision_start_token_id"]
    (model_dir / "config.json").write_text(json.dumps(config))
    source = resolve_model_source(model_dir)
    model = frontend_for(source).load(source, dtype=torch.float32)
    assert model.config.vision_start_token_id == TOKEN_ID["<|vision_bos|>"]
    with torch.no_grad():  # the rope index reads it
        model(**tiny_multimodal_inputs(model, kind, audio=True), use_cache=False)


def test_trace_of_a_thinker_reaches_its_audio_vision_projector_and_text_stages(tmp_path):
    from slimc.commands.explain import trace_report

    report = trace_report(str(save_tiny_multimodal("qwen2_5_omni", tmp_path / "model")))
    assert "stages audio (2), vision (4), projector (1), text (2)" in report
    assert "block model.audio_tower.layers.0 [audio]" in report
