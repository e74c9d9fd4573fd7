"""`python -m pipeline COMMAND ...`: run, build-data, build-kb, runs, report.

Heavy imports (Ray, torch) happen inside the commands, so a config error exits at once.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config

USAGE = """usage: python -m pipeline COMMAND [ARGS]

commands:
  run CONFIG [--set key=value ...]   run an evaluation (resumes into an existing --set run_id=...)
  build-data [CONFIG] [--set ...]    build the embedded default data and source model
  build-kb ARGS                      build a faiss knowledge base (see build-kb --help)
  runs list|show|compare ...         find and compare runs (see runs --help)
  report RUN_DIR [RUN_DIR ...]       write CSV + PNG reports into RUN_DIR/report/
  bench-suite [ARGS]                 performance analyzer: ablations x batch sizes x workers
"""


def _config_args(prog: str, need_config: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {prog}")
    parser.add_argument("config", nargs=None if need_config else "?", help="YAML run config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set ttt.lr=0.01 (repeatable)")
    return parser


def cmd_run(argv: list[str]) -> int:
    args = _config_args("run", True).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from pipeline.run import format_summary, run_job

    run_dir = run_job(cfg)
    print(format_summary(run_dir), flush=True)
    return 0


def cmd_build_data(argv: list[str]) -> int:
    args = _config_args("build-data", False).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from pipeline.run import prepare

    cfg = prepare(cfg)
    print(f"manifest:   {cfg.data.manifest}\ncheckpoint: {cfg.model.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "run":
            return cmd_run(rest)
        if command == "build-data":
            return cmd_build_data(rest)
        if command == "build-kb":
            from pipeline.build_kb import main as build_kb_main

            return build_kb_main(rest)
        if command == "runs":
            from pipeline.runs import runs_main

            return runs_main(rest)
        if command == "bench-suite":
            from pipeline.bench_suite import main as bench_suite_main

            return bench_suite_main(rest)
        if command == "report":
            from pipeline.report import report_main

            return report_main(rest)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ValueError as exc:  # manifest / model-load errors: one line, no traceback
        if type(exc).__name__ in ("ManifestError", "ModelLoadError", "MissingHookError", "UpdateFilterError"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
