"""Bad inputs as users meet them through `slimc.commands.cli.main`: exit 2, one `slimc: error:` message naming the
problem and the fix, no traceback (`--debug` shows it), and nothing lost or half-written.

Runs in process on tiny models; each case fails before or at loading where it can, so the file stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_diffusion import save_tiny_pipeline, tiny_transformer
from tiny_models import tiny_causal_lm
from tiny_multimodal import save_tiny_multimodal
from tiny_omni import save_tiny_full_omni
from tiny_tokenizer import tiny_tokenizer

from slimc.backends.mindie import MindieBackend
from slimc.commands import cli, export, record
from slimc.commands.export import MARKER_FILE, REPORT_FILE
from slimc.errors import SlimcError
from slimc.frontends import diffusion_data
from slimc.frontends.data import MAX_LINE_CHARS, corpus_token_samples
from slimc.ir.source import check_finite_weights, load_model, resolve_model_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# No `version`: the current one. No smoothing: the compiles that must succeed stay short.
CONFIG = """\
model: {dtype: float32}
calibration: {samples: 4, seq_len: 32, batch_size: 2}
schemes:
  w8a8_dynamic:
    weight: {dtype: int8, granularity: per_channel, symmetric: true}
    act: {dtype: int8, granularity: per_token, symmetric: true, dynamic: true}
pipeline:
  - pass: fake_quant
    rules: [{scheme: w8a8_dynamic, include: ["*"], exclude: ["lm_head"]}]
  - pass: calibrate
  - pass: lower
export: [{format: mindie}]
"""
SMALL = ["--set", "calibration.samples=4", "--set", "calibration.seq_len=32", "--set", "calibration.batch_size=2"]


@pytest.fixture(autouse=True)
def cli_globals(monkeypatch):
    """`main` sets how warnings print; keep that to each test."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def llama(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A private copy of the tiny Llama, to break."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))


def run(capsys, *args: str | Path) -> tuple[int, str]:
    """`slimc ARGS` in this process: (exit code, stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_user_error(capsys, args: list, *words: str, error: type = SlimcError) -> str:
    """Exit 2 with one `slimc: error:` message holding every word and no traceback; with --debug, the error
    itself (so its traceback) comes out. Returns the message."""
    code, err = run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert [line.startswith("slimc: error:") for line in err.splitlines()].count(True) == 1, err
    message = err[err.index("slimc: error:"):]
    for word in words:
        assert str(word) in message, f"{word!r} not in:\n{message}"
    with pytest.raises(error), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.main(["--debug", *map(str, args)])
    return message


def compile_args(config: Path, model: Path, out: Path, *extra: str) -> list:
    return ["compile", config, "--model", model, "--out", out, *extra]


def private_dirs(out: Path) -> list[str]:
    """Staging and swap directories beside an output."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def drop_tensor(model_dir: Path, wanted) -> str:
    """Delete the first tensor whose name `wanted` accepts from a checkpoint (and its index); return its name."""
    index = next(iter(model_dir.glob("*.safetensors.index.json")), None)
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(file)
        name = next((n for n in sorted(tensors) if wanted(n)), None)
        if name is not None:
            del tensors[name]
            save_file(tensors, file, metadata={"format": "pt"})
            if index is not None:
                data = json.loads(index.read_text())
                del data["weight_map"][name]
                index.write_text(json.dumps(data))
            return name
    raise AssertionError("no tensor matched")


def edit_tensors(model_dir: Path, edit) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@contextlib.contextmanager
def unreadable(path: Path, monkeypatch):
    """`path` without read permission. Root reads it anyway, so for root opening it fails as it would for others."""
    path.chmod(0)
    if os.geteuid() == 0:
        real_open = Path.open

        def denied(self, *args, **kwargs):
            if os.path.abspath(self) == os.path.abspath(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    try:
        yield path
    finally:
        path.chmod(0o644)


def fails_if_loaded(monkeypatch) -> None:
    """Make loading the model an internal error, to show a check ran before it."""
    def load_program(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("slimc.commands.compile.load_program", load_program)


# --- 1. checkpoints that do not fill the model ----------------------------------------------------------


def test_a_checkpoint_missing_a_tensor_names_it_instead_of_compiling_random_weights(capsys, config, llama, tmp_path):
    dropped = drop_tensor(llama, lambda n: n == "model.layers.1.mlp.down_proj.weight")
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), dropped, "1 tensor of the model missing",
                      "incomplete", "config.json")
    assert not (tmp_path / "out").exists()


def test_a_config_claiming_more_layers_than_the_weights_hold_names_the_missing_layer(capsys, config, llama, tmp_path):
    edit_config(llama, num_hidden_layers=3)
    message = assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"),
                                "9 tensors of the model missing", "model.layers.2.", "(4 more)", "config.json")
    assert "model.layers.1." not in message
    assert not (tmp_path / "out").exists()


def _vision_language(directory: Path) -> tuple[Path, str, str]:
    model = save_tiny_multimodal("qwen2_5_vl", directory)
    return model, "qwen2_5_vl/w8a8.yaml", drop_tensor(model, lambda n: "blocks.0." in n)


def _omni(directory: Path) -> tuple[Path, str, str]:
    model = save_tiny_full_omni("qwen2_5_omni", directory)  # talker and vocoder tensors, which the thinker skips
    dropped = drop_tensor(model, lambda n: n.startswith("thinker.audio_tower.layers.1."))
    return model, "qwen2_5_omni/w8a8.yaml", dropped.removeprefix("thinker.")


def _diffusion(directory: Path) -> tuple[Path, str, str]:
    tiny_transformer("flux").save_pretrained(directory)
    return directory, "flux/w8a8.yaml", drop_tensor(directory, lambda n: "single_transformer_blocks.0." in n)


@pytest.mark.parametrize("make", [_vision_language, _omni, _diffusion], ids=["multimodal", "omni", "diffusion"])
def test_every_frontend_refuses_a_checkpoint_missing_a_tensor(capsys, tmp_path, make):
    model, shipped, dropped = make(tmp_path / "model")
    message = assert_user_error(capsys, compile_args(shipped, model, tmp_path / "out"), dropped,
                                "1 tensor of the model missing from the checkpoint")
    assert "does not have" not in message  # an omni checkpoint's talker tensors are not the thinker's business
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_absent_from_the_checkpoint_are_not_reported_missing(tmp_path):
    tiny_causal_lm("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tied")  # no lm_head.weight stored
    assert load_model(resolve_model_source(tmp_path / "tied"), dtype=torch.float32).config.tie_word_embeddings


# --- 2. --overwrite, atomic replacement, leftovers of killed runs ----------------------------------------


def test_overwrite_refuses_a_directory_slimc_did_not_write_and_keeps_its_files(capsys, config, llama, tmp_path, monkeypatch):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    fails_if_loaded(monkeypatch)
    assert_user_error(capsys, compile_args(config, llama, out, "--overwrite"), str(out), "not written by slimc",
                      "choose another --out", "remove the directory yourself")
    assert (out / "holiday.jpg").read_bytes() == b"precious"


def test_overwrite_replaces_an_earlier_output_in_one_swap_and_marks_the_new_one(capsys, config, llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("{}")  # an output of a slimc that wrote no marker yet
    (out / "stale.txt").write_text("from an earlier run")
    code, err = run(capsys, *compile_args(config, llama, out, "--overwrite"))
    assert code == 0, err
    assert (out / MARKER_FILE).is_file() and (out / "mindie").is_dir()
    assert not (out / "stale.txt").exists()
    assert private_dirs(out) == []


def test_a_swap_that_fails_puts_the_earlier_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER_FILE).write_text("")
    (out / "weights").write_text("earlier")
    real_rename = Path.rename

    def rename(self, target):
        if Path(target) == out.resolve() and self.name.startswith(".out.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="Input/output"), export.staged_output(out, overwrite=True) as staging:
        (staging / "weights").write_text("new")
    assert (out / "weights").read_text() == "earlier"
    assert private_dirs(out) == []


def test_leftovers_of_a_killed_run_are_cleaned_up_and_a_moved_aside_output_put_back(capsys, config, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(dead.stdout), export._host()
    out = tmp_path / "out"
    staging = tmp_path / f".out.tmp-{host}-{pid}-abc123"
    aside = tmp_path / f".out.old-{host}-{pid}-0123abcd"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-live00"
    elsewhere = tmp_path / f".out.tmp-{host}x-{pid}-other0"  # another host's: its process cannot be checked
    for directory in (staging, aside, live, elsewhere):
        directory.mkdir()
    (aside / MARKER_FILE).write_text("")
    # Killed between moving the old output aside and renaming the new one in: the old one comes back (and,
    # without --overwrite, is kept).
    assert_user_error(capsys, compile_args(config, tmp_path / "nowhere", out), "already exists")
    assert (out / MARKER_FILE).is_file()
    assert private_dirs(out) == sorted([live.name, elsewhere.name])


def test_record_overwrite_leaves_the_old_file_whole_when_the_write_fails(capsys, tmp_path, monkeypatch):
    pipeline = save_tiny_pipeline("flux", tmp_path / "flux")
    out = tmp_path / "inputs.safetensors"
    out.write_bytes(b"an earlier recording")
    calls = [diffusion_data.RecordedCall("transformer", {"hidden_states": torch.zeros(1, 4)})]
    monkeypatch.setattr(record, "record_pipeline_calls", lambda *args, **kwargs: calls)

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diffusion_data, "save_file", full_disk)
    assert_user_error(capsys, ["record", "flux/w8a8.yaml", "--model", pipeline, "--out", out, "--overwrite"],
                      "ran out of space", str(out.resolve()), "free space")
    assert out.read_bytes() == b"an earlier recording"
    assert private_dirs(out) == []


# --- 3. large calibration files --------------------------------------------------------------------------


def test_a_large_text_file_is_read_only_as_far_as_the_windows_need(tmp_path):
    path = tmp_path / "large.txt"
    paragraph = "The quick brown fox jumps over the lazy dog, again and again. " * 16 + "\n\n"
    with path.open("w", encoding="utf-8") as f:
        for _ in range(64 * 2**20 // len(paragraph)):
            f.write(paragraph)
    tokenizer = tiny_tokenizer()
    tracemalloc.start()
    try:
        ids, _ = corpus_token_samples(tokenizer, str(path), samples=4, seq_len=32, recommended=None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.shape == (4, 32)
    assert peak < path.stat().st_size / 4, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.0f} MiB file"


def test_a_jsonl_line_over_the_limit_is_refused_naming_file_and_line(capsys, config, llama, tmp_path):
    data = tmp_path / "calibration.jsonl"
    with data.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a short first sample"}) + "\n")
        f.write('{"text": "' + "x" * (MAX_LINE_CHARS + 16) + '"}\n')
    args = compile_args(config, llama, tmp_path / "out", "--set", f"calibration.dataset={data}")
    assert_user_error(capsys, args, str(data), "line 2", "longer than 32 MiB", "split it")
    assert not (tmp_path / "out").exists()


# --- 4. user errors that were internal errors ------------------------------------------------------------


def test_a_truncated_weight_file_is_named_as_incomplete(capsys, config, llama, tmp_path):
    weights = llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), weights, "incomplete",
                      "download or copy it again")


def test_a_tensor_of_another_shape_names_the_tensor_and_both_shapes(capsys, config, llama, tmp_path):
    edit_tensors(llama, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(100, 64)))
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), "model.layers.0.mlp.up_proj.weight",
                      "checkpoint 100×64", "config.json 128×64")


def test_a_hidden_size_that_does_not_match_the_weights_is_named(capsys, config, llama, tmp_path):
    edit_config(llama, hidden_size=128)
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), "hidden_size is 128", "checkpoint's is 64",
                      "model.embed_tokens.weight (checkpoint 512×64, config.json 512×128)")


def test_an_unreadable_config_json_is_named(capsys, config, llama, tmp_path, monkeypatch):
    with unreadable(llama / "config.json", monkeypatch) as path:
        assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), path, "cannot be read",
                          "Permission denied", "chmod")


def test_a_full_disk_while_writing_is_named_and_leaves_only_what_resume_needs(capsys, config, llama, tmp_path, monkeypatch):
    def write_then_fill_the_disk(self, program, out_dir):
        (out_dir / "quant_model_weights.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patches:
        patches.setattr(MindieBackend, "write", write_then_fill_the_disk)
        out = tmp_path / "out"
        assert_user_error(capsys, compile_args(config, llama, out), "ran out of space", out.resolve(), "MiB needed",
                          "free under", "partial output was removed")
    assert not out.exists() and private_dirs(out) == [".out.resume"]  # every block committed: no need to redo them
    assert run(capsys, *compile_args(config, llama, out, "--resume"))[0] == 0
    assert (out / "mindie" / "quant_model_weights.safetensors").is_file() and private_dirs(out) == []


def test_an_output_parent_that_is_not_writable_is_refused_before_loading(capsys, config, llama, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: fail creating entries there as it would for other users
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    fails_if_loaded(monkeypatch)
    try:
        assert_user_error(capsys, compile_args(config, llama, locked / "out"), locked, "Permission denied",
                          "writable", "choose another --out")
    finally:
        locked.chmod(0o755)


def test_too_little_free_space_is_refused_before_loading(capsys, config, llama, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    fails_if_loaded(monkeypatch)
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), "not enough disk space", "0.5 MiB needed",
                      "0.0 MiB free", str(tmp_path), "choose another --out")


# --- 5. misleading messages ------------------------------------------------------------------------------


def test_nan_and_inf_weights_are_named_at_load_not_blamed_on_a_pass(capsys, config, llama, tmp_path):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        tensors["model.layers.0.self_attn.q_proj.weight"][1, 1] = float("inf")

    edit_tensors(llama, poison)
    message = assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), "NaN or Inf", "2 tensors",
                                "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")
    assert "smooth" not in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_finds_nan_and_inf_and_passes_large_values_whose_sum_overflows(dtype, tmp_path):
    def layer(weight: torch.Tensor) -> torch.nn.Module:
        linear = torch.nn.Linear(8, 4, bias=False, dtype=dtype)
        linear.weight.data = weight.to(dtype)
        return linear

    large = torch.full((4, 8), torch.finfo(dtype).max, dtype=dtype)  # finite; the sum of a slice is not
    for finite in (large, torch.randn(4, 8)):
        check_finite_weights(layer(finite), tmp_path, chunk=5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for weight in (large.clone(), torch.randn(4, 8).to(dtype)):
            weight[3, 7] = bad
            with pytest.raises(SlimcError, match="NaN or Inf values in 1 tensor"):
                check_finite_weights(layer(weight), tmp_path, chunk=5)


def test_an_unreadable_weight_file_says_it_cannot_be_read(capsys, config, llama, tmp_path, monkeypatch):
    with unreadable(llama / "model.safetensors", monkeypatch) as path:
        message = assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), path, "cannot be read",
                                    "Permission denied")
    assert "No such file" not in message


@pytest.mark.parametrize("shipped, model, family, configs", [
    ("flux/w8a8.yaml", "llama", "diffusion", "llm/"),
    ("qwen2_5_vl/w8a8.yaml", "llama", "multimodal", "llm/"),
    ("llm/w8a8_dynamic.yaml", "flux", "llm", "flux/"),
])
def test_a_config_for_another_model_family_names_that_family_and_the_matching_configs(
        capsys, tmp_path, tiny_llama_dir, monkeypatch, shipped, model, family, configs):
    if model == "flux":
        tiny_transformer("flux").save_pretrained(tmp_path / "flux")
    path = tiny_llama_dir if model == "llama" else tmp_path / "flux"
    fails_if_loaded(monkeypatch)
    message = assert_user_error(capsys, compile_args(shipped, path, tmp_path / "out", *SMALL),
                                f"another model family: {family}", configs, "slimc configs")
    assert "unknown built-in" not in message


def test_an_unknown_builtin_dataset_still_lists_the_known_ones(capsys, config, tiny_llama_dir, tmp_path):
    args = compile_args(config, tiny_llama_dir, tmp_path / "out", "--set", "calibration.dataset=builtin:wiki")
    assert_user_error(capsys, args, "unknown built-in dataset 'builtin:wiki'", "builtin:text")


def test_a_permission_error_no_check_caught_is_still_a_user_error_naming_the_path(capsys, config, tmp_path, monkeypatch):
    def compile_model(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/shared/tokenizer.json")

    monkeypatch.setattr("slimc.commands.compile.compile_model", compile_model)
    assert_user_error(capsys, compile_args(config, tmp_path, tmp_path / "out"), "/models/shared/tokenizer.json",
                      "Permission denied", error=PermissionError)


# --- 6. configs that cannot be what the user meant -------------------------------------------------------


def test_an_empty_config_is_refused_instead_of_writing_nothing(capsys, llama, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_user_error(capsys, compile_args(empty, llama, tmp_path / "out"), "empty.yaml: pipeline: the config has no "
                      "passes, so nothing would be quantized")
    assert not (tmp_path / "out").exists()


def test_a_config_without_export_is_refused_instead_of_writing_nothing(capsys, config, llama, tmp_path):
    config.write_text(CONFIG.replace("export: [{format: mindie}]", ""))
    assert_user_error(capsys, compile_args(config, llama, tmp_path / "out"), "export: the config names no output format",
                      "export: [{format: mindie}]")
    assert not (tmp_path / "out").exists()


def test_a_config_path_that_is_a_directory_binary_or_a_yaml_alias_bomb_is_a_user_error(capsys, llama, tmp_path):
    assert_user_error(capsys, compile_args(tmp_path, llama, tmp_path / "out"), "is a directory, not a config file")
    binary = tmp_path / "model.safetensors.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_user_error(capsys, compile_args(binary, llama, tmp_path / "out"), "is not UTF-8 text")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)))
    assert_user_error(capsys, compile_args(bomb, llama, tmp_path / "out"), "expands to more than 20000 values")
    assert not (tmp_path / "out").exists()


def test_output_read_by_a_program_that_stops_reading_ends_quietly():
    """`slimc configs | head -1`: the reader has gone before slimc writes (here: before it starts)."""
    process = subprocess.Popen([sys.executable, "-m", "slimc.commands.cli", "configs"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == ""
