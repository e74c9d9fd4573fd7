"""The job: config, CLI, manifests, sharding on Ray, Parquet outputs, resume, embedded defaults."""
