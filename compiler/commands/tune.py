"""`slimc compile` with a `tune:` section: fall back from the configured schemes until an accuracy target is met.

The planned layers are ranked once, as `slimc analyze` ranks them (each quantized alone, its block's output error on
the calibration data). Then compiles run in rounds: each is evaluated on held-out data (perplexity against the float
model's, through the written files, as `slimc eval` measures it); while the increase is above
`tune.max_ppl_increase`, the next `tune.step` layers move one entry down `tune.fallback` (breadth first: every ranked
layer takes its first fallback, most sensitive first, before any takes its second) and the config compiles again.
It stops when the target is met, when an output grows past `tune.max_size_increase` of the first round's, after
`tune.max_rounds` compiles, or when no layer has a fallback left. The round of smallest increase within the size
budget is published, its report carrying the `tune` section: every round, every fallen-back layer with the
measurement that put it first in line, and the size it cost. A streamed compile's round starts from the journal of
the round before (slimc.journal.continue_from): the blocks before the first that holds a moved layer are unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from slimc.commands.analyze import LayerSensitivity, measure_layers, measuring_pipeline
from slimc.commands.compile import REPORT_FILE, check_not_inside, compile_model, resolve_source, streams
from slimc.commands.evaluate import check_held_out, evaluate
from slimc.commands.export import check_output_dir, remove_dead_runs, scratch_directory, staged_output
from slimc.commands.provenance import identity_config
from slimc.config import FLOAT, SlimcConfig, config_from_data, with_evaluation
from slimc.errors import ConfigError
from slimc.frontends import frontend_for
from slimc.journal import continue_from, journal_directory
from slimc.numerics.fidelity import json_safe
from slimc.passes.fake_quant import FakeQuant
from slimc.progress import MESSAGES
from slimc.report import RunReport


@dataclass
class Round:
    number: int
    fallbacks: dict[str, str]  # layer -> the fallback it was compiled with
    ppl_increase: float  # the worst format's quantized perplexity / float's - 1
    size: int  # bytes of every format written
    evaluation: dict
    report: RunReport
    directory: Path
    reused_blocks: int  # blocks taken from the round before (those before the first with a layer it moved)

    def summary(self, first_size: int, budget: float) -> dict:
        return {"round": self.number, "fallen_back": len(self.fallbacks), "reused_blocks": self.reused_blocks,
                "ppl_increase": self.ppl_increase,
                "size_bytes": self.size, "size_increase": self.size / first_size - 1.0,
                "within_size_budget": self.size <= first_size * (1 + budget)}


@dataclass
class Tuned:
    report: RunReport  # the published round's, with its `tune` section
    met: bool
    rounds: list[Round] = field(default_factory=list)


def fallback_chain(layer: LayerSensitivity, fallback: list[str]) -> list[str]:
    """The layer's fallbacks in order, less its own scheme (falling back to it would change nothing)."""
    return [name for name in fallback if name != layer.scheme]


def next_moves(ranking: list[LayerSensitivity], fallbacks: dict[str, str], fallback: list[str],
               step: int) -> dict[str, str]:
    """The next `step` layers to move one fallback further, and where: those with the fewest fallbacks taken first,
    most sensitive first among them."""
    candidates = []
    for layer in ranking:
        chain = fallback_chain(layer, fallback)
        taken = chain.index(fallbacks[layer.name]) + 1 if layer.name in fallbacks else 0
        if taken < len(chain):
            candidates.append((taken, layer.rank, layer.name, chain[taken]))
    return {name: target for _, _, name, target in sorted(candidates)[:step]}


def with_fallbacks(config: SlimcConfig, fallbacks: dict[str, str]) -> SlimcConfig:
    """The config with each fallen-back layer excluded from every fake_quant rule and, unless it falls back to
    float, given its fallback scheme by a last rule (the later rule wins)."""
    if not fallbacks:
        return config
    data = config.resolved()
    for step in data["pipeline"]:
        if step["pass"] != FakeQuant.name:
            continue
        for rule in step["rules"]:
            rule["exclude"] = [*rule["exclude"], *sorted(fallbacks)]
        for scheme in dict.fromkeys(fallbacks.values()):
            if scheme != FLOAT:
                step["rules"].append({"scheme": scheme, "include": sorted(n for n, s in fallbacks.items() if s == scheme)})
    return config_from_data(data, source=config.source_file, lines=config.lines)


def block_before_change(blocks: list[str], changed: Collection[str]) -> set[str]:
    """The block before the first of `blocks` holding a `changed` layer (none if that is the first): the next round
    starts from the state after it."""
    first = next((i for i, block in enumerate(blocks) if any(name.startswith(f"{block}.") for name in changed)), 0)
    return {blocks[first - 1]} if first > 0 else set()


def worst_increase(results: dict) -> float:
    """The largest relative perplexity change over the written formats: the target holds for every one."""
    return max(entry["relative_change"] for entry in results["quantized"].values())


def reason(layer: LayerSensitivity, total: int) -> str:
    return (f"rank {layer.rank} of {total}: block-output relative error {layer.block_error:.3g} with only this layer "
            f"quantized ({layer.scheme}); input kurtosis {layer.kurtosis:.3g}, outlier channels {layer.outlier_ratio:.1%}")


def tune_compile(config: SlimcConfig, *, model_path: str | None, out_dir: Path, overwrite: bool = False) -> Tuned:
    """Rank the layers, compile and evaluate in rounds as the config's `tune` says, and publish the best round in
    `out_dir` (see the module's docstring)."""
    tune = config.tune
    if tune is None:
        raise ConfigError(f"{config.source_file}: tune_compile needs a `tune:` section")
    measuring_pipeline(config)  # a config without fake_quant is refused before anything loads
    remove_dead_runs(out_dir)
    check_output_dir(out_dir, overwrite)
    source = resolve_source(config, model_path)
    frontend = frontend_for(source, config.model.family)
    check_not_inside(source, out_dir)
    if frontend.evaluation_metric != "perplexity":
        raise ConfigError(f"{config.where('tune')}: tune: the target is a perplexity increase, and {source.architecture} "
                          f"is evaluated by {frontend.evaluation_metric}; remove the tune section for this model")
    evaluation_config = with_evaluation(config, dataset=tune.dataset)
    check_held_out(tune.dataset, config.calibration.dataset)
    ranking_report = RunReport()
    rounds: list[Round] = []
    with scratch_directory(out_dir) as scratch:
        with ranking_report.timed("ranking"):
            measured = measure_layers(config, source, frontend, ranking_report,
                                      scratch if streams(config, source, frontend) else None, tune.rank_batches)
            ranking, blocks = measured.layers, [block.name for block in measured.program.blocks]
            del measured
        fallbacks: dict[str, str] = {}
        moves: dict[str, str] = {}
        float_losses: dict = {}  # the float model's, measured in round 0 and reused
        stopped = f"tune.max_rounds ({tune.max_rounds}) compiles done"
        for number in range(tune.max_rounds):
            directory = scratch / f"round-{number}"
            round_config = with_fallbacks(config, fallbacks)
            reused = 0
            if rounds:  # a streamed compile's journal: the blocks before the first changed one are taken as they are
                earlier = journal_directory(rounds[-1].directory)
                reused = continue_from(earlier, directory, moves, identity_config(round_config.resolved()))
                shutil.rmtree(earlier, ignore_errors=True)
            moves = next_moves(ranking, fallbacks, tune.fallback, tune.step)  # the next round's, if there is one
            report = compile_model(round_config, model_path=model_path, out_dir=directory, resume=reused > 0,
                                   keep_journal=block_before_change(blocks, moves)).report
            results = evaluate(source, directory, evaluation_config, calibrated_on=config.calibration.dataset,
                               float_losses=float_losses)
            rounds.append(Round(number, dict(fallbacks), worst_increase(results), sum(report.outputs.values()),
                                results, report, directory, reused))
            discard_superseded(rounds, tune.max_size_increase)
            MESSAGES.info("tune round %d: %d layers fallen back, perplexity %+.2f%% over float (target %+.2f%%), "
                          "output %.2f MiB", number, len(fallbacks), 100 * rounds[-1].ppl_increase,
                          100 * tune.max_ppl_increase, rounds[-1].size / 2**20)
            if rounds[-1].ppl_increase <= tune.max_ppl_increase:
                stopped = "the target is met"
                break
            if rounds[-1].size > rounds[0].size * (1 + tune.max_size_increase):
                stopped = f"the output grew past tune.max_size_increase ({tune.max_size_increase:.0%})"
                break
            if not moves:
                stopped = "every ranked layer has taken its last fallback"
                break
            fallbacks.update(moves)
        best = best_round(rounds, tune.max_size_increase)
        met = best.ppl_increase <= tune.max_ppl_increase
        report = best.report
        report.evaluation = json_safe(best.evaluation)
        report.tune = tune_section(config, ranking, rounds, best, met, stopped, ranking_report)
        with staged_output(out_dir, overwrite) as staging:
            for item in best.directory.iterdir():
                shutil.move(item, staging / item.name)
            (staging / REPORT_FILE).write_text(report.to_json())
        report.location = out_dir / REPORT_FILE
    return Tuned(report, met, rounds)


def best_round(rounds: list[Round], max_size_increase: float) -> Round:
    """The round of smallest perplexity increase whose output is within the size budget (the first always is)."""
    return min((r for r in rounds if r.size <= rounds[0].size * (1 + max_size_increase)), key=lambda r: r.ppl_increase)


def discard_superseded(rounds: list[Round], max_size_increase: float) -> None:
    """Remove the outputs no longer needed: all but the best round's and the last's."""
    best = best_round(rounds, max_size_increase)
    for earlier in rounds[:-1]:
        if earlier is not best:
            shutil.rmtree(earlier.directory, ignore_errors=True)


def tune_section(config: SlimcConfig, ranking: list[LayerSensitivity], rounds: list[Round], best: Round, met: bool,
                 stopped: str, ranking_report: RunReport) -> dict:
    """The report's `tune` entry: the target, every round, the published round's fallen-back layers with the
    measurement that ranked each, the size they cost, and one line saying whether the target was met."""
    tune = config.tune
    first = rounds[0].size
    by_name = {layer.name: layer for layer in ranking}
    fallen = [{"layer": name, "from": by_name[name].scheme, "to": scheme, "rank": by_name[name].rank,
               "block_error": by_name[name].block_error, "reason": reason(by_name[name], len(ranking))}
              for name, scheme in sorted(best.fallbacks.items(), key=lambda item: by_name[item[0]].rank)]
    cost = best.size - first
    increase, target = f"{best.ppl_increase:+.2%}", f"{tune.max_ppl_increase:+.2%}"
    if met:
        outcome = (f"target met: perplexity {increase} over float (target {target}) in round {best.number}, "
                   f"{len(fallen)} layers fallen back, output {cost / first:+.1%} ({cost / 2**20:+.2f} MiB)")
    else:
        outcome = (f"target NOT met: stopped because {stopped}; the best round within the size budget, round "
                   f"{best.number} (perplexity {increase} over float, target {target}, {len(fallen)} layers fallen "
                   f"back, output {cost / first:+.1%}), was written")
    return json_safe({
        "max_ppl_increase": tune.max_ppl_increase, "fallback": tune.fallback, "step": tune.step,
        "max_size_increase": tune.max_size_increase, "ranked_by": "block_error", "rank_batches": tune.rank_batches,
        "ranking_seconds": ranking_report.seconds.get("ranking"),
        "rounds": [r.summary(first, tune.max_size_increase) for r in rounds],
        "chosen_round": best.number, "met": met, "stopped": stopped,
        "fallen_back": fallen, "size_cost_bytes": cost, "size_cost": cost / first, "outcome": outcome,
    })


def render_tune(section: dict) -> str:
    """The rounds and the fallen-back layers for the terminal, ending with the outcome line."""
    lines = ["", "tune rounds (perplexity increase over float, output size):"]
    for entry in section["rounds"]:
        budget = "" if entry["within_size_budget"] else "  over the size budget"
        chosen = "  <- written" if entry["round"] == section["chosen_round"] else ""
        reused = f", {entry['reused_blocks']} blocks reused" if entry["reused_blocks"] else ""
        lines.append(f"  round {entry['round']}: {entry['fallen_back']:3d} fallen back{reused}  {entry['ppl_increase']:+.2%}"
                     f"  {entry['size_bytes'] / 2**20:.2f} MiB ({entry['size_increase']:+.1%}){budget}{chosen}")
    if section["fallen_back"]:
        lines.append("fallen back (why: the measured sensitivity that ranked it):")
        lines.extend(f"  {item['layer']}: {item['from']} -> {item['to']}  ({item['reason']})"
                     for item in section["fallen_back"])
    lines.append(f"tune: {section['outcome']}")
    return "\n".join(lines)
