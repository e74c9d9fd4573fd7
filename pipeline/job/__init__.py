"""The job: one evaluation run (or several sharing a pool) on Ray.

Owns: `runner.run_job` / `run_jobs` (the whole story, top to bottom), `record.Run` (a run's
state and its run.json), `pool` (worker actors, how many, where, their replacement, the shared
KB / adapter-cache actors, `warm_workers`), `scheduler` (work items, commits, giving up),
`ray_start` (joining or starting Ray), `checks` (start-up refusals), `inputs` (the manifest as
Ray Data blocks), `outputs` (atomic commits, summary), `fingerprint`, `progress`, `provenance`,
`protocol` (shards vs streams, the end-of-run error-row verdict and notes), `local` (the Ray-free
mode: one stream in this process on the same adapters, methods, decoding and loop).

May import: `pipeline.config`, `pipeline.manifest`, `pipeline.embedded`, and `ttt`, `kb_index`,
`workers`. Never `pipeline.benchmarks`, `pipeline.analysis` or `pipeline.campaigns`.
Nothing is imported here, so `import pipeline.job.outputs` does not load Ray.
"""
