"""Analysis: everything that reads run directories after (or while) runs write them.

Owns: `runs` (the run registry: `query_runs`, `RunSet`), `tidy` (the run-level columns the registry
adds to rows at read time: setting, model, method, seed, the config fields that vary, corruption and
severity), `runs_cli` (the `runs` command),
`report` (CSV, PNG and report.md), `plots` (the heat maps, stream, cache and timing plots and
markdown tables every report draws with), `stats` (intervals and tests), `tracking` (MLflow
export), `bench_suite` with `measure` (the performance analyzer).

May import: `pipeline.config`, `pipeline.manifest`, `pipeline.job` (the analyzer runs jobs;
the registry reads run.json through the job's writers), `pipeline.benchmarks`, and `ttt`.
Never `pipeline.campaigns`: a campaign's table is drawn with this room's public helpers.
"""
