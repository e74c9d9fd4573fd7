"""The job and everything around it, in rooms with one-way doors.

    config.py, manifest.py   the foundation: a validated run config and the manifest format;
                             they import no other part of `pipeline`
    embedded/                embedded defaults built offline: MNIST-C, the text corpus and tiny
                             GPT-2, SmolLM2's conversion, the default source CNN, KB builds
    job/                     one evaluation run on Ray: start-up checks, inputs, the Run record,
                             the worker pool, the scheduler, outputs, fingerprints, progress
    benchmarks/              manifest layouts, the five settings, the corruption generator, the zoo
    analysis/                reading run directories: the registry, reports and plots, statistics,
                             MLflow export, the performance analyzer
    campaigns/               sweeps: grids of runs and the campaign record
    cli.py, harness.py       the command line and the lm-evaluation-harness model, on top

A room imports only rooms listed above it (and `ttt`, `kb_index`, `workers`); analysis never
imports campaigns and the job imports neither. `tests/test_layout.py` enforces the doors, the
absence of import cycles and the line budgets (400 a module, 60 a function).
"""
