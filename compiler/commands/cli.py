"""The `slimc` command line. Errors print one message and exit 2; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from slimc import __version__
from slimc.configs import resolve_config_path
from slimc.environment import untested_versions_warning
from slimc.errors import ExportError, SlimcError, describe_os_error
from slimc.progress import MESSAGES, Verbosity, logging_to

if TYPE_CHECKING:
    from slimc.config import SlimcConfig

EXIT_ERROR = 2
EXIT_INTERNAL = 3


def _compile(args: argparse.Namespace) -> int:
    from slimc.commands.compile import compile_model, record_evaluation, resolve_source
    from slimc.commands.evaluate import check_held_out, evaluate, render_results
    from slimc.commands.launch import launch
    from slimc.config import load_config

    if args.out is None and not args.dry_run:
        raise SlimcError("compile needs --out DIR, the directory to write the outputs to (only --dry-run runs without one)")
    config = load_config(resolve_config_path(args.config), args.set)
    if args.dry_run:
        return _dry_run(config, args.model, args.out)
    if config.tune is not None:
        return _tune(config, args)
    if args.eval and config.evaluation.dataset:
        check_held_out(config.evaluation.dataset, config.calibration.dataset)  # before the compile, not after
    if args.nproc > 1:
        if args.resume:
            raise SlimcError(f"--resume continues a compile run in one process, and --nproc {args.nproc} runs it in "
                             f"{args.nproc}: a compile of several processes keeps no journal; resume without --nproc, "
                             "or start again with --overwrite")
        if launch(args.nproc, args.argv) != 0:
            raise SlimcError(f"a process of the {args.nproc} stopped the compile (its message is above); nothing was written")
        return 0
    compiled = compile_model(config, model_path=args.model, out_dir=Path(args.out), overwrite=args.overwrite,
                             resume=args.resume)
    if not compiled.wrote:  # one of several processes: the first prints and evaluates
        return 0
    report = compiled.report
    print(report.render())
    print(f"\nwrote {args.out}")
    if args.eval:
        results = evaluate(resolve_source(config, args.model), Path(args.out), config, calibrated_on=config.calibration.dataset)
        record_evaluation(report, results)
        print(render_results(results))
    return 0


def _tune(config: SlimcConfig, args: argparse.Namespace) -> int:
    """A compile with a `tune:` section: rounds of compile and evaluation; 1 when the target was not met (the best
    round's output is written all the same)."""
    from slimc.commands.evaluate import render_results
    from slimc.commands.tune import render_tune, tune_compile

    if args.nproc > 1 or args.resume:
        raise SlimcError(f"{config.where('tune')}: tune compiles in rounds in one process and keeps no journal to "
                         "resume; run without --nproc and --resume")
    tuned = tune_compile(config, model_path=args.model, out_dir=Path(args.out), overwrite=args.overwrite)
    print(tuned.report.render())
    print(render_results(tuned.report.evaluation))
    print(render_tune(tuned.report.tune))
    print(f"\nwrote {args.out}" + ("" if tuned.met else " (the best round's output; the target was not met)"))
    return 0 if tuned.met else 1


def _dry_run(config: SlimcConfig, model_path: str | None, out: str | None) -> int:
    """Print the plan, every broken shape rule, and the estimated peak memory, disk and output, from the model's
    skeleton, and check that `out` can be written; 1 if a rule is broken or the machine falls short."""
    from slimc.commands.compile import check_does_something, check_inputs, quantization_plan
    from slimc.commands.doctor import Diagnosis, check_compile
    from slimc.commands.export import check_writable
    from slimc.commands.shape_rules import broken_rules, render_plan
    from slimc.environment import existing_ancestor

    check_does_something(config)
    inputs = check_inputs(config, model_path)
    plan = quantization_plan(config, inputs)
    broken = broken_rules(plan, inputs.backends)
    target = Path(out) if out is not None else Path.cwd()
    diagnosis = Diagnosis()
    check_compile(diagnosis, config, model_path, existing_ancestor(target))
    if out is not None:
        try:
            check_writable(existing_ancestor(target), target)
        except ExportError as error:
            diagnosis.problems.append(str(error))
    print("\n".join(diagnosis.lines))
    print(render_plan(plan, broken, inputs.backends))
    if diagnosis.problems:
        print("problems:\n" + "\n".join(f"  - {problem}" for problem in diagnosis.problems))
    print("dry run: nothing was loaded, calibrated or written")
    return 1 if broken or diagnosis.problems else 0


def _analyze(args: argparse.Namespace) -> None:
    from slimc.commands.analyze import ANALYSIS_FILE, PLOT_FILE, analyze_model, render_table
    from slimc.config import load_config

    config = load_config(resolve_config_path(args.config), args.set)
    analysis = analyze_model(config, model_path=args.model, out_dir=Path(args.out), end_to_end=args.end_to_end,
                             top=args.top, batches=args.batches, overwrite=args.overwrite)
    print(render_table(analysis))
    print(f"\nwrote {Path(args.out) / ANALYSIS_FILE} and {Path(args.out) / PLOT_FILE}")


def _eval(args: argparse.Namespace) -> None:
    from slimc.commands.compile import resolve_source
    from slimc.commands.evaluate import evaluate, render_results
    from slimc.config import load_config, settings_config, with_evaluation
    from slimc.numerics.fidelity import json_safe

    config = load_config(resolve_config_path(args.config), args.set) if args.config else settings_config(args.set)
    config = with_evaluation(config, dataset=args.corpus, samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    results = evaluate(resolve_source(config, args.model), Path(args.quantized) if args.quantized else None, config,
                       fidelity=args.fidelity)
    print(json.dumps(json_safe(results)) if args.json else render_results(results))


def _record(args: argparse.Namespace) -> None:
    from slimc.commands.record import record_to_file
    from slimc.config import load_config
    from slimc.frontends.diffusion_data import summary

    config = load_config(resolve_config_path(args.config), args.set)
    path, calls = record_to_file(config, args.model, Path(args.out), overwrite=args.overwrite)
    print(f"recorded {summary(calls)} to {path}\nuse it with --set calibration.dataset={path}")


def _trace(args: argparse.Namespace) -> None:
    from slimc.commands.explain import trace_report

    print(trace_report(args.model, seq_len=args.seq_len))


def _passes(args: argparse.Namespace) -> None:
    from slimc.commands.listing import pass_listing, render_passes

    listing = pass_listing()
    print(json.dumps(listing, indent=2) if args.json else render_passes(listing))


def _doctor(args: argparse.Namespace) -> int:
    from slimc.commands.doctor import diagnose
    from slimc.config import load_config

    config = load_config(resolve_config_path(args.config), args.set) if args.config else None
    diagnosis = diagnose(config, args.model, Path(args.out))
    print(diagnosis.render())
    return 1 if diagnosis.problems else 0


def _migrate(args: argparse.Namespace) -> None:
    path = Path(args.config)
    if args.source == "msmodelslim":
        import yaml

        from slimc.config.msmodelslim import from_msmodelslim, read_msmodelslim

        converted, notes = from_msmodelslim(read_msmodelslim(path), source=str(path))
        header = f"# Converted from the msModelSlim config {path.name} by slimc {__version__} (slimc migrate --from msmodelslim)\n"
        print(header + yaml.safe_dump(converted, sort_keys=False, default_flow_style=None, width=110), end="")
    else:
        from slimc.commands.migrate import migrated_yaml

        text, notes = migrated_yaml(path)
        print(text, end="")
        if not notes:
            notes = [f"{path} is already the current config version; printed unchanged"]
    for note in notes:
        MESSAGES.info("note: %s", note)


def _configs(args: argparse.Namespace) -> None:
    from slimc.commands.listing import config_listing, render_configs

    listing = config_listing()
    print(json.dumps(listing, indent=2) if args.json else render_configs(listing))


def add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after its name. A subcommand's copy sets no default
    (`defaults=False`), so that it does not undo the same option given before the subcommand."""
    default = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs", **default)
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress (warnings and errors still)", **default)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every progress step as a line, and info logs",
                        **default)
    parser.add_argument("--log-file", type=Path, metavar="PATH", help="append a plain-text log of the run to PATH: messages, "
                        "warnings, what is printed, and every progress step as a line, each with its time", **default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimc", description="Post-training quantization compiler for transformer models.")
    parser.add_argument("--version", action="version", version=f"slimc {__version__}")
    add_global_options(parser, defaults=True)
    options = argparse.ArgumentParser(add_help=False)
    add_global_options(options, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="quantize a model as a YAML config says and write its outputs", parents=[options],
                       epilog="A config with a `tune:` section compiles in rounds, moving the most sensitive layers to "
                       "its fallback schemes until the perplexity target is met; exit status 1 when it is not (the best "
                       "round is written all the same; docs/accuracy.md)")
    p.add_argument("config", help="YAML config path, or a shipped config name such as llm/w8a8_dynamic.yaml")
    p.add_argument("--model", help="model directory, .gguf file, or Hugging Face Hub id org/name (from the cache unless HF_HUB_OFFLINE=0) "
                   "(default: the config's model.path, else SmolLM2-135M)")
    p.add_argument("--out", help="output directory (one subdirectory per export format); required unless --dry-run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory (and an interrupted "
                   "compile's committed blocks)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted compile of --out from its first block "
                   "not committed (same config, model and slimc), giving the files an uninterrupted one would")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (parsed as YAML)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="run the compile in N processes on this machine "
                   "(torchrun, torch.distributed), sharing the calibration batches; one per GPU or NPU for cuda and npu "
                   "(docs/distributed.md)")
    p.add_argument("--eval", action="store_true", help="afterwards, evaluate the output as `slimc eval` does (config's evaluation section)")
    p.add_argument("--dry-run", action="store_true", help="print which layers get which scheme, every layer whose shape "
                   "its scheme or an export format cannot hold, the estimated peak memory, disk and output size, and "
                   "whether --out can be written, then exit (1 if anything falls short) without loading weights or calibrating")
    p.set_defaults(run=_compile)

    p = sub.add_parser("analyze", help="measure each quantized layer's sensitivity alone (block-output error, optionally "
                       "the model's loss) with activation outlier proxies; writes analysis.json and analysis.png",
                       parents=[options])
    p.add_argument("config", help="the compile config (path or shipped name) whose pipeline and schemes to measure")
    p.add_argument("--model", help="model directory, .gguf file, or Hugging Face Hub id (default: the config's model.path)")
    p.add_argument("--out", required=True, help="directory for analysis.json and analysis.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--end-to-end", action="store_true", help="also measure the model's next-token loss on the "
                   "calibration batches with each layer alone quantized (a forward of the whole model per layer; the "
                   "model is loaded whole)")
    p.add_argument("--top", type=int, metavar="K", help="with --end-to-end, only the K layers of largest block error")
    p.add_argument("--batches", type=int, metavar="N", help="measure the block errors on the first N calibration batches "
                   "(default: all; the passes before fake_quant see all of them either way)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (parsed as YAML)")
    p.set_defaults(run=_analyze)

    p = sub.add_parser("record", help="run a diffusers pipeline on the calibration prompts and save its transformer inputs",
                       parents=[options])
    p.add_argument("config", help="YAML config whose calibration section (prompts, samples, diffusion sampling) to use")
    p.add_argument("--model", help="the diffusers pipeline directory (with model_index.json); default: the config's model.path")
    p.add_argument("--out", required=True, help="the .safetensors file to write (then: --set calibration.dataset=FILE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value (parsed as YAML)")
    p.set_defaults(run=_record)

    p = sub.add_parser("trace", help="print the blocks, leaves and patterns found in a model", parents=[options])
    p.add_argument("model", nargs="?", help="model directory, .gguf file or Hugging Face Hub id (default: SmolLM2-135M)")
    p.add_argument("--seq-len", type=int, help="tokens of the traced text sample (default: what the model family needs)")
    p.set_defaults(run=_trace)

    p = sub.add_parser("eval", help="what quantization lost: perplexity (LLMs) or fidelity to the float model (other families)",
                       parents=[options])
    p.add_argument("--model", help="the float model: directory, .gguf file or Hub id (default: the config's model.path, "
                   "else SmolLM2-135M)")
    p.add_argument("--quantized", help="a `slimc compile` output directory: every format in it (mindie, vllm, onnx) is "
                   "evaluated; or one format's subdirectory")
    p.add_argument("--config", help="a compile config whose model, calibration (image size, sampling) and evaluation settings to use")
    p.add_argument("--corpus", help="held-out dataset (default: the config's evaluation.dataset, else the model family's: "
                   "builtin:text-eval for LLMs); for text, a .txt file or a .jsonl of {\"text\": ...}")
    p.add_argument("--samples", type=int, help="evaluation samples (default 40)")
    p.add_argument("--seq-len", type=int, help="tokens per text sample (default 512)")
    p.add_argument("--batch-size", type=int, help="samples per batch (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. calibration.diffusion.height=256 (parsed as YAML)")
    p.add_argument("--fidelity", action="store_true", help="measure fidelity (block outputs and logits) for an LLM too")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(run=_eval)

    p = sub.add_parser("doctor", help="check library versions, accelerators, memory and disk; with a model and config, "
                       "what the compile would quantize and need", parents=[options])
    p.add_argument("config", nargs="?", help="a compile config (path or shipped name): estimate its compile")
    p.add_argument("--model", help="model directory, .gguf file, or Hugging Face Hub id org/name (from the cache unless HF_HUB_OFFLINE=0) "
                   "(default: the config's model.path, else SmolLM2-135M)")
    p.add_argument("--out", default=".", help="where the output would go, for the disk check (default: here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config value")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("migrate", help="print a config upgraded to the current version, or converted from msModelSlim",
                       parents=[options])
    p.add_argument("config", help="the config file: an older slimc config, or with --from msmodelslim a msModelSlim V1 "
                   "quantization config (apiversion: modelslim_v1 ...)")
    p.add_argument("--from", dest="source", choices=["slimc", "msmodelslim"], default="slimc",
                   help="what the file is (default: an older slimc config); notes on what changed go to stderr")
    p.set_defaults(run=_migrate)

    p = sub.add_parser("passes", help="list registered passes, what they do, and their parameters: types, allowed "
                       "values, defaults", parents=[options])
    p.add_argument("--json", action="store_true", help="print one JSON object: pass name -> description, parameters")
    p.set_defaults(run=_passes)

    p = sub.add_parser("configs", help="list shipped configs, the models they target, their passes and formats",
                       parents=[options])
    p.add_argument("--json", action="store_true", help="print one JSON object: config name -> path, description, passes")
    p.set_defaults(run=_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    if getattr(args, "nproc", 1) < 1:
        parser.error("--nproc needs at least 1 process")
    if int(os.environ.get("RANK", "0")) != 0:  # one of several processes torchrun started (slimc.distributed)
        args.quiet, args.verbose = True, False  # the first speaks for all; the others print only their errors
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.formatwarning = lambda message, category, *rest: f"slimc: warning: {message}\n"
    if args.log_file is not None:
        try:
            args.log_file.open("a").close()
        except OSError as error:
            print(f"slimc: error: cannot write the log file {args.log_file} ({error.strerror}); choose another --log-file",
                  file=sys.stderr)
            return EXIT_ERROR
    with logging_to(Verbosity(quiet=args.quiet, verbose=args.verbose, debug=args.debug), args.log_file):
        logging.getLogger("slimc").info("slimc %s: %s", __version__, shlex.join(sys.argv[1:] if argv is None else argv))
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command's exit status; a problem is one message (with --debug, the traceback)."""
    if args.run is not _doctor and (untested := untested_versions_warning()) is not None:
        MESSAGES.warning("warning: %s", untested)
    try:
        status = args.run(args)
    except SlimcError as error:
        if args.debug:
            raise
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        MESSAGES.error("error: %s%s", "" if rank is None else f"process {rank}: ", error)
        return EXIT_ERROR
    except KeyboardInterrupt:
        MESSAGES.error("interrupted; no output was published")
        return 130
    except BrokenPipeError:  # whoever read the output stopped reading (`slimc configs | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    except Exception as error:
        if args.debug:
            raise
        # Last resort: a full disk or a permission problem that no check above caught is still the user's to fix.
        if isinstance(error, OSError) and (message := describe_os_error(error)):
            MESSAGES.error("error: %s", message)
            return EXIT_ERROR
        MESSAGES.error("internal error: %s: %s\n(run again with --debug for the traceback, and report it)",
                       type(error).__name__, error, exc_info=True)  # the traceback goes to the log file only
        return EXIT_INTERNAL
    return status or 0

if __name__ == "__main__":
    sys.exit(main())
