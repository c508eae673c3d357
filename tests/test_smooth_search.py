"""The smoothing search on a token subset: which rows it runs, that the scales still come from every token, and
that a subset as informative as the whole batch chooses what the whole batch chooses."""

import operator

import pytest
import torch
from programs import W8A8_DYNAMIC, calibration_ids, run_pipeline
from tiny_models import tiny_causal_lm

import slimc.numerics.calib as calib
import slimc.passes.smooth as smooth
from slimc.ir.calls import spread_rows, take_rows
from slimc.ir.hooks import temporary_hooks
from slimc.ir.partial import ObservedPrefix, PartialRuns

SCHEMES = {"w8": W8A8_DYNAMIC}
QUANTIZE = {"pass": "fake_quant", "rules": [{"scheme": "w8", "exclude": ["*mlp.gate"]}]}


def search(model, batches, **fields):
    """Run the smoothing search (grid 0.3-0.9) before W8A8 fake quantization; returns the report."""
    step = {"pass": "smooth", "search": True, "search_grid": [0.3, 0.5, 0.7, 0.9], **fields}
    return run_pipeline(model, [step, QUANTIZE], SCHEMES, batches=batches)[1]


@pytest.mark.parametrize(("rows", "per_row", "tokens", "expected"), [
    (4, 24, 48, [0, 2]),       # two rows' worth, spread over the batch
    (4, 24, 60, [0, 2]),       # whole rows only: 60 tokens fill two
    (4, 24, 10, [0]),          # at least one row
    (4, 24, 1000, [0, 1, 2, 3]),
    (8, 16, 48, [0, 2, 5]),
    (4, 24, None, [0, 1, 2, 3]),
])
def test_searched_rows_are_whole_rows_evenly_spread(rows, per_row, tokens, expected):
    assert spread_rows(rows, per_row, tokens) == expected


@pytest.mark.parametrize(("errors", "expected", "trials"), [
    ([5, 4, 3, 2, 3, 4, 5], 0.7, 3),     # the middle alpha is the minimum: it and its two neighbours
    ([5, 4, 3, 2.5, 2, 1, 3], 0.9, 5),   # walks up to 0.9, where 1.0 is worse
    ([1, 2, 3, 4, 5, 6, 7], 0.4, 5),     # walks down to the grid's end
])
def test_descent_walks_to_the_minimum_of_a_unimodal_error_measuring_each_alpha_once(errors, expected, trials):
    grid = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    by_alpha, measured = dict(zip(grid, errors)), []
    alpha, error = smooth.grid_minimum(list(reversed(grid)), lambda a: measured.append(a) or by_alpha[a], descend=True)
    assert (alpha, error) == (expected, min(errors)) and len(measured) == len(set(measured)) == trials
    assert smooth.grid_minimum(grid, by_alpha.__getitem__, descend=False) == (expected, min(errors))


def test_descent_stops_at_a_local_minimum_which_the_whole_grid_passes():
    """SmolLM2 block 11's attention group, as measured: two dips. Descent from 0.7 keeps 0.7; `grid` finds 0.5."""
    errors = {0.4: 0.00178, 0.5: 0.00151, 0.6: 0.00413, 0.7: 0.00385, 0.8: 0.00415, 0.9: 0.00269, 1.0: 0.0036}
    assert smooth.grid_minimum(list(errors), errors.__getitem__, descend=True) == (0.7, 0.00385)
    assert smooth.grid_minimum(list(errors), errors.__getitem__, descend=False) == (0.5, 0.00151)


def test_the_search_runs_search_tokens_worth_of_rows_the_same_every_time(monkeypatch):
    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    ran = []
    original = smooth.Smooth._search_calls

    def recorded(self, block, ctx, outputs):
        calls, reference = original(self, block, ctx, outputs)
        ran.append([tuple(args[0].shape) if args else tuple(kwargs["hidden_states"].shape) for args, kwargs in calls])
        return calls, reference

    monkeypatch.setattr(smooth.Smooth, "_search_calls", recorded)
    first = search(tiny_causal_lm("qwen2"), batches, search_tokens=48)
    second = search(tiny_causal_lm("qwen2"), batches, search_tokens=48)
    assert ran[0] == [(2, 24, 64)]  # of the one search batch (search_batches 1), rows 0 and 2
    assert first.details["smooth_alpha"] == second.details["smooth_alpha"]
    search(tiny_causal_lm("qwen2"), batches, search_tokens=48, search_batches=2)
    assert ran[-1] == [(1, 24, 64), (1, 24, 64)]  # 24 tokens of each batch: one row


def test_the_scales_come_from_every_calibration_token(monkeypatch):
    """The channel maxima the scales are made of are the same whatever the search runs on."""
    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    seen: dict[str | None, list[torch.Tensor]] = {}
    original = smooth.smoothing_scales
    for tokens in (24, None):
        seen[tokens] = []
        monkeypatch.setattr(smooth, "smoothing_scales", lambda act, weight, alpha, t=tokens: seen[t].append(act) or original(act, weight, alpha))
        search(tiny_causal_lm("llama"), batches, search_tokens=tokens, search_grid=[0.5])
    assert len(seen[24]) == len(seen[None]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen[24], seen[None]))


def test_a_subset_of_repeated_rows_chooses_what_all_rows_choose():
    """Where every row is the same sequence, one row measures the same errors as four: the same alphas."""
    row = calibration_ids(512, batches=1, batch_size=1, seq_len=32)[0]
    batches = [row.repeat(4, 1)]
    subset = search(tiny_causal_lm("qwen2"), batches, search_tokens=32).details["smooth_alpha"]
    whole = search(tiny_causal_lm("qwen2"), batches, search_tokens=None).details["smooth_alpha"]
    assert subset == whole and any(alpha is not None for alpha in whole.values())


def test_take_rows_cuts_per_row_tensors_and_keeps_shared_ones():
    hidden, mask, rotary = torch.randn(4, 6, 8), torch.randn(4, 1, 6, 6), torch.randn(1, 6, 2)
    args, kwargs = take_rows(((hidden,), {"attention_mask": mask, "position_embeddings": (rotary, rotary), "use_cache": False}), [1, 3])
    assert torch.equal(args[0], hidden[[1, 3]]) and torch.equal(kwargs["attention_mask"], mask[[1, 3]])
    assert kwargs["position_embeddings"][0] is rotary and kwargs["use_cache"] is False


def test_the_report_times_the_equivalence_checks_and_block_outputs_apart_from_the_passes():
    """Every block run the pipeline makes is in the report's per-pass profile: the smoothing pass, the
    equivalence check around it (smooth preserves the function) and the run that gives the next block its inputs."""
    model = tiny_causal_lm("llama")
    report = search(model, calibration_ids(model.config.vocab_size))
    assert {"smooth", "fake_quant", "equivalence check", "block outputs"} <= set(report.seconds)
    assert all(seconds > 0 for seconds in report.seconds.values())
    assert set(report.cpu_seconds) == set(report.seconds) and report.cpu_seconds["smooth"] > 0


def test_search_trials_recompute_only_what_the_group_reaches_and_measure_what_whole_runs_measure(monkeypatch):
    """After a group's first trial, a trial runs only the graph nodes downstream of the group's tensors; its errors
    are those of whole block runs, bit for bit, so the choices are too."""
    model = tiny_causal_lm("llama")
    batches = calibration_ids(model.config.vocab_size, batches=2, batch_size=4, seq_len=24)
    errors: dict[str, list[float]] = {"partial": [], "whole": []}
    executed: list[tuple[int, int]] = []
    original_error, original_execute = smooth.relative_error, PartialRuns._execute

    def execute(self, order, env, keep):
        executed.append((len(order), len(self._all)))
        return original_execute(self, order, env, keep)

    monkeypatch.setattr(PartialRuns, "_execute", execute)
    for mode in ("partial", "whole"):
        monkeypatch.setattr(smooth, "relative_error", lambda q, f, m=mode: errors[m].append(original_error(q, f)) or errors[m][-1])
        if mode == "whole":
            monkeypatch.setattr(PartialRuns, "reading", classmethod(lambda cls, gm, tensors: None))
        report = search(tiny_causal_lm("llama"), batches, search_scope="block")
        assert any(alpha is not None for alpha in report.details["smooth_alpha"].values())
    assert errors["partial"] == errors["whole"] and len(errors["whole"]) > 0
    later = [ran for ran, nodes in executed if ran < nodes]
    assert later and min(later) < max(nodes for _, nodes in executed) / 2  # the MLP's groups skip the attention


def test_sublayer_trials_run_only_the_sublayer_and_measure_its_output_as_whole_runs_compute_it(monkeypatch):
    """With `search_scope: sublayer` a group's trials end at o_proj (attention) or down_proj (MLP): they execute
    only what that output needs, and their errors are those of the same Linear's outputs in whole block runs."""
    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    errors: dict[str, list[float]] = {"sublayer": [], "whole": []}
    ends: list[tuple[str, int, int]] = []
    original_error, original_run = smooth.relative_error, PartialRuns.run

    def run(self, calls):
        ends.append((self.until.target, len(self._all), len(self.graph_module.graph.nodes)))
        return original_run(self, calls)

    def whole_run(self, calls):  # the whole block, the sublayer's output taken by a hook on its Linear
        seen = []
        with temporary_hooks() as hooks:
            hooks.after(self.graph_module.get_submodule(self.until.target), lambda m, args, out: seen.append(out))
            for flat in calls:
                self.graph_module(*flat)
        return seen

    for mode, runner in (("sublayer", run), ("whole", whole_run)):
        monkeypatch.setattr(smooth, "relative_error", lambda q, f, m=mode: errors[m].append(original_error(q, f)) or errors[m][-1])
        monkeypatch.setattr(PartialRuns, "run", runner)
        search(tiny_causal_lm("llama"), batches)
    assert errors["sublayer"] == errors["whole"] and len(errors["whole"]) > 0
    assert {end for end, _, _ in ends} == {"self_attn.o_proj", "mlp.down_proj"}
    assert all(ran < nodes for end, ran, nodes in ends if end == "self_attn.o_proj")  # the MLP is not run


def test_linears_reading_one_tensor_quantize_it_once_in_a_trial_with_the_same_errors(monkeypatch):
    """q, k and v (gate and up) read one activation: a search trial quantizes it once for all of them, and measures
    what quantizing it for each gives, bit for bit."""
    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    errors: dict[str, list[float]] = {"shared": [], "each": []}
    quantized = {"shared": 0, "each": 0}
    original_error, original_act = smooth.relative_error, calib.simulate_act
    for mode in ("shared", "each"):
        monkeypatch.setattr(smooth, "relative_error", lambda q, f, m=mode: errors[m].append(original_error(q, f)) or errors[m][-1])
        monkeypatch.setattr(calib, "simulate_act", lambda x, s, m=mode: quantized.__setitem__(m, quantized[m] + 1) or original_act(x, s))
        if mode == "each":
            monkeypatch.setattr(calib.LastQuantized, "__call__", lambda self, x, s: self._quantize(x, s))
        search(tiny_causal_lm("llama"), batches)
    assert errors["shared"] == errors["each"] and len(errors["each"]) > 0
    assert 0 < quantized["shared"] < quantized["each"]


def test_the_statistics_run_stops_before_the_last_linear_and_measures_what_whole_runs_measure(monkeypatch):
    """Batches the search does not run go through the block only as far as the observed values (the down
    projection's input is the last): the channel maxima, so the scales, are those of whole runs, bit for bit."""
    batches = calibration_ids(512, batches=3, batch_size=2, seq_len=24)
    seen: dict[str, list[torch.Tensor]] = {"prefix": [], "whole": []}
    executed: list[tuple[int, int]] = []
    original_scales, original_run = smooth.smoothing_scales, ObservedPrefix.run

    def run(self, flat_inputs, record):
        executed.append((len(self._order), len(self.graph_module.graph.nodes)))
        return original_run(self, flat_inputs, record)

    monkeypatch.setattr(ObservedPrefix, "run", run)
    for mode in ("prefix", "whole"):
        monkeypatch.setattr(smooth, "smoothing_scales", lambda act, weight, alpha, m=mode: seen[m].append(act) or original_scales(act, weight, alpha))
        if mode == "whole":
            monkeypatch.setattr(ObservedPrefix, "of", classmethod(lambda cls, gm, targets: None))
        search(tiny_causal_lm("llama"), batches, search_grid=[0.5])
    assert len(seen["prefix"]) == len(seen["whole"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen["prefix"], seen["whole"]))
    assert executed and all(ran < nodes for ran, nodes in executed)  # two batches per block, short of the output


def _filled_in_place() -> torch.fx.GraphModule:
    """Wan's rotary embedding in small, as slimc's tracer records it: a tensor from `torch.empty_like`, filled
    through slice assignments (`operator.setitem` nodes, which no value reads), then read by the last Linear."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_module("first", (x,))
    out = graph.call_function(torch.empty_like, (h,))
    odd, even = (graph.call_function(operator.getitem, (h, (Ellipsis, slice(start, None, 2)))) for start in (1, 0))
    graph.call_function(operator.setitem, (out, (Ellipsis, slice(0, None, 2)), graph.call_function(operator.neg, (odd,))))
    graph.call_function(operator.setitem, (out, (Ellipsis, slice(1, None, 2)), even))
    graph.output(graph.call_module("last", (out,)))
    torch.manual_seed(0)
    return torch.fx.GraphModule(torch.nn.ModuleDict({"first": torch.nn.Linear(8, 8), "last": torch.nn.Linear(8, 8)}), graph)


def test_a_value_filled_in_place_is_observed_as_a_whole_run_computes_it():
    graph_module, x = _filled_in_place(), torch.randn(3, 8)
    recorded: dict[str, torch.Tensor] = {}
    ObservedPrefix.of(graph_module, {"last": "input"}).run([x], lambda leaf, value: recorded.setdefault(leaf, value.clone()))
    h = graph_module.first(x)
    assert torch.equal(recorded["last"], torch.stack([-h[..., 1::2], h[..., 0::2]], dim=-1).flatten(-2))
    # A trial recomputing from `first` would keep `out` from the first run while writing into it again: whole runs.
    assert PartialRuns.reading(graph_module, [graph_module.first.weight]) is None
    assert PartialRuns.reading(graph_module, [graph_module.last.weight]) is None


def test_experts_beside_a_quantized_shared_expert_take_trials_on_their_inputs_not_their_weights(monkeypatch):
    """GLM-4.7's MLP norm feeds a quantized shared expert and float fused experts: a trial multiplies the experts'
    inputs back by the scales instead of rewriting (and copying, to undo) their weights. It measures what scaling
    their weights measures, to float32 rounding, so the choices and the smoothed model are the same."""
    import dataclasses

    batches = calibration_ids(512, batches=2, batch_size=4, seq_len=24)
    errors: dict[str, list[float]] = {"inputs": [], "weights": []}
    trial_tensors: dict[str, list[int]] = {"inputs": [], "weights": []}
    original_error, original_reading, original_migration = smooth.relative_error, PartialRuns.reading, smooth._norm_migration
    results = {}
    for mode in ("inputs", "weights"):
        monkeypatch.setattr(smooth, "relative_error", lambda q, f, m=mode: errors[m].append(original_error(q, f)) or errors[m][-1])
        monkeypatch.setattr(PartialRuns, "reading", classmethod(
            lambda cls, gm, tensors, m=mode: trial_tensors[m].append(max(t.numel() for t in tensors)) or original_reading(gm, tensors)))
        if mode == "weights":
            monkeypatch.setattr(smooth, "_norm_migration", lambda *args: dataclasses.replace(original_migration(*args), restricted=None))
        model = tiny_causal_lm("glm4_moe")
        experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
        assert experts and all(hasattr(m, "gate_up_proj") for m in experts)
        report = search(model, batches)
        results[mode] = (report.details["smooth_alpha"], {k: v.clone() for k, v in model.state_dict().items()})
    assert results["inputs"][0] == results["weights"][0]
    assert torch.allclose(torch.tensor(errors["inputs"]), torch.tensor(errors["weights"]), rtol=1e-4)
    experts_size = experts[0].gate_up_proj.numel()
    assert max(trial_tensors["weights"]) == experts_size > max(trial_tensors["inputs"])
    for name, tensor in results["inputs"][1].items():
        assert torch.equal(tensor, results["weights"][1][name]), name
