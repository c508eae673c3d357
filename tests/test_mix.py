"""The multi-domain built-in text: `builtin:mix` calibrates, `builtin:eval` evaluates by domain (slimc.frontends.mix)."""

from __future__ import annotations

import json

import pytest
import torch
from compile_settings import SMALL_CALIBRATION
from conftest import save_tiny_model
from tiny_tokenizer import tiny_tokenizer

from slimc.commands.cli import main
from slimc.commands.compile import compile_model
from slimc.commands.evaluate import (
    check_held_out,
    evaluate_perplexity,
    perplexity,
    render_results,
    streamed_ascend_perplexity,
)
from slimc.config import CalibrationConfig, load_config
from slimc.configs import resolve_config_path
from slimc.errors import ConfigError, DataError
from slimc.frontends import frontend_for
from slimc.frontends.data import load_corpus
from slimc.frontends.llm import text_batches
from slimc.frontends.mix import MIXES, conversations, domain_documents, domain_windows, text_windows
from slimc.ir.source import resolve_model_source

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calibration_text(tokenizer):
    return "\n\n".join(doc for docs in domain_documents("builtin:mix", tokenizer).values() for doc in docs)


def test_the_calibration_mix_draws_on_prose_technical_code_and_dialogue_and_evaluation_on_three_others():
    assert [d.name for d in MIXES["builtin:mix"]] == ["prose", "technical", "code", "dialogue"]
    assert [d.name for d in MIXES["builtin:eval"]] == ["reference", "code", "humour"]
    assert [d.name for d in MIXES["builtin:validation"]] == ["technical", "code"]
    for spec in MIXES:
        assert sum(d.share for d in MIXES[spec]) == pytest.approx(1.0)


def test_the_mix_is_the_same_windows_on_every_call():
    first, first_sha = text_windows(tiny_tokenizer(), "builtin:mix", samples=16, seq_len=64, recommended=None)
    second, second_sha = text_windows(tiny_tokenizer(), "builtin:mix", samples=16, seq_len=64, recommended=None)
    assert torch.equal(first, second) and first_sha == second_sha
    assert first.shape == (16, 64)


def test_each_domain_gets_its_share_of_the_windows(tokenizer):
    windows, _ = domain_windows(tokenizer, "builtin:mix", samples=20, seq_len=32)
    assert {name: ids.shape[0] for name, ids in windows.items()} == {"prose": 6, "technical": 5, "code": 5, "dialogue": 4}
    windows, _ = domain_windows(tokenizer, "builtin:eval", samples=40, seq_len=32)
    assert {name: ids.shape[0] for name, ids in windows.items()} == {"reference": 16, "code": 16, "humour": 8}


def test_the_calibration_windows_are_the_domains_windows_shuffled(tokenizer):
    mixed, _ = text_windows(tokenizer, "builtin:mix", samples=20, seq_len=32, recommended=None)
    by_domain, _ = domain_windows(tokenizer, "builtin:mix", samples=20, seq_len=32)
    together = torch.cat(list(by_domain.values()))
    assert sorted(map(tuple, mixed.tolist())) == sorted(map(tuple, together.tolist()))
    assert not torch.equal(mixed, together)  # shuffled: a batch holds more than one domain


def test_each_domain_window_is_text_of_that_domain_alone(tokenizer):
    documents = domain_documents("builtin:mix", tokenizer)
    windows, _ = domain_windows(tokenizer, "builtin:mix", samples=8, seq_len=32)
    for name, ids in windows.items():
        text = "\n\n".join(documents[name])
        assert all(tokenizer.decode(row) in text for row in ids.tolist()), name


@pytest.mark.parametrize("held_out", ["builtin:eval", "builtin:validation"])
def test_no_held_out_document_is_calibration_text(tokenizer, calibration_text, held_out):
    for name, documents in domain_documents(held_out, tokenizer).items():
        shared = [doc for doc in documents if doc in calibration_text]
        assert not shared, (name, shared[:3])


@pytest.mark.parametrize("held_out", ["builtin:eval", "builtin:validation"])
def test_no_held_out_window_appears_in_the_calibration_text(tokenizer, calibration_text, held_out):
    windows, _ = domain_windows(tokenizer, held_out, samples=60, seq_len=24)
    for name, ids in windows.items():
        found = [text for text in map(tokenizer.decode, ids.tolist()) if text in calibration_text]
        assert not found, (name, found[:3])


def test_no_validation_window_appears_in_the_evaluation_text(tokenizer):
    evaluation_text = "\n\n".join(doc for docs in domain_documents("builtin:eval", tokenizer).values() for doc in docs)
    windows, _ = domain_windows(tokenizer, "builtin:validation", samples=60, seq_len=24)
    assert {name: ids.shape[0] for name, ids in windows.items()} == {"technical": 30, "code": 30}
    for name, ids in windows.items():
        found = [text for text in map(tokenizer.decode, ids.tolist()) if text in evaluation_text]
        assert not found, (name, found[:3])


def test_dialogue_is_rendered_by_the_chat_template_where_the_tokenizer_has_one():
    plain = conversations(tiny_tokenizer())
    assert plain[0].startswith("User: ") and "\nAssistant: " in plain[0]
    chat = tiny_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    templated = conversations(chat)
    assert len(templated) == len(plain)
    first_user = plain[0].split("\n")[0].removeprefix("User: ")
    assert templated[0].startswith(f"<|user|>{first_user}<|end|>\n<|assistant|>")


def test_a_chat_template_that_refuses_the_turns_is_a_data_error():
    chat = tiny_tokenizer()
    chat.chat_template = "{{ raise_exception('only one message') }}"
    with pytest.raises(DataError, match="chat template cannot render"):
        conversations(chat)


def test_a_mix_is_not_one_text():
    with pytest.raises(DataError, match="builtin:mix draws on several domains"):
        load_corpus("builtin:mix")


@pytest.mark.parametrize(("evaluated", "calibrated"), [("builtin:text", "builtin:mix"), ("builtin:eval", "builtin:text-eval"),
                                                      ("builtin:mix", "builtin:mix")])
def test_evaluating_on_text_the_calibration_held_is_refused(evaluated, calibrated):
    shared = "is the calibration dataset" if evaluated == calibrated else f"shares text with the calibration dataset {calibrated}"
    with pytest.raises(ConfigError, match=f"the evaluation dataset {evaluated} {shared}; evaluate on held-out data"):
        check_held_out(evaluated, calibrated)


def test_the_evaluation_and_validation_mixes_after_a_calibration_on_the_mix_are_allowed():
    check_held_out("builtin:eval", "builtin:mix")
    check_held_out("builtin:validation", "builtin:mix")
    check_held_out("builtin:text-eval", "builtin:mix")


def test_the_llm_calibration_batches_read_the_mix(tokenizer):
    batches = text_batches(CalibrationConfig(dataset="builtin:mix", samples=8, seq_len=32, batch_size=4), tokenizer)
    expected, _ = text_windows(tokenizer, "builtin:mix", samples=8, seq_len=32, recommended=None)
    assert torch.equal(torch.cat(batches), expected)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, one_torch_thread):
    work = tmp_path_factory.mktemp("mix")
    model_dir = save_tiny_model(work / "model", "llama")
    config = load_config(resolve_config_path("llm/w8a8_dynamic.yaml"),
                         [*SMALL_CALIBRATION, "calibration.dataset=builtin:mix", "pipeline.0.search=false",
                          "export=[{format: mindie}]"])
    compile_model(config, model_path=str(model_dir), out_dir=work / "out")
    source = resolve_model_source(model_dir)
    results = evaluate_perplexity(source, work / "out" / "mindie", corpus="builtin:eval", samples=7, seq_len=24,
                                  batch_size=2, config=config)
    windows, _ = domain_windows(tiny_tokenizer(), "builtin:eval", samples=7, seq_len=24)
    return source, work / "out" / "mindie", results, windows


def test_each_domains_perplexity_is_that_of_its_windows_alone(compiled):
    source, mindie, results, windows = compiled
    frontend = frontend_for(source)
    model = frontend.load(source, dtype=torch.float32)
    assert set(results["domains"]) == set(windows) == {"reference", "code", "humour"}
    for name, ids in windows.items():
        assert results["domains"][name]["float_ppl"] == pytest.approx(perplexity(model, ids, batch_size=2), rel=1e-6)
        alone = streamed_ascend_perplexity(mindie, frontend, ids, batch_size=2)
        assert results["quantized"]["mindie"]["domains"][name]["quantized_ppl"] == pytest.approx(alone, rel=1e-6)


def test_the_overall_perplexity_weighs_every_token_the_same(compiled):
    source, _, results, windows = compiled
    model = frontend_for(source).load(source, dtype=torch.float32)
    everything = torch.cat(list(windows.values()))
    assert results["float_ppl"] == pytest.approx(perplexity(model, everything, batch_size=1), rel=1e-6)
    assert results["tokens"] == everything.numel() and results["samples"] == 7


def test_the_printed_table_shows_every_domain_and_the_overall_figure(compiled):
    _, _, results, _ = compiled
    text = render_results({"metric": "perplexity", **results})
    header = next(line for line in text.splitlines() if "overall" in line)
    assert header.split() == ["reference", "code", "humour", "overall"]
    mindie = next(line for line in text.splitlines() if line.strip().startswith("mindie"))
    assert f"{results['quantized']['mindie']['domains']['humour']['quantized_ppl']:.4f}" in mindie
    assert f"{results['quantized']['mindie']['quantized_ppl']:.4f}" in mindie


def test_slimc_eval_prints_and_writes_the_figures_of_every_domain(compiled, capsys):
    source, mindie, results, _ = compiled
    arguments = ["eval", "--model", str(source.path), "--quantized", str(mindie.parent), "--corpus", "builtin:eval",
                 "--samples", "7", "--seq-len", "24"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "humour" in printed and "overall" in printed
    assert main([*arguments, "--json"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(written["domains"]) == {"reference", "code", "humour"}
    # batches of 4 (the CLI's default) instead of 2: the same figures
    assert written["domains"]["code"]["float_ppl"] == pytest.approx(results["domains"]["code"]["float_ppl"], rel=1e-5)
    assert set(written["quantized"]["mindie"]["domains"]) == {"reference", "code", "humour"}
