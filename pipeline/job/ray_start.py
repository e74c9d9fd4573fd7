"""Starting or joining Ray: the one place the job calls `ray.init`.

A run joins the cluster at RAY_ADDRESS (inside `ray job submit` Ray sets it), else starts a local
instance for this driver alone. What the local instance exposes is decided here.
"""
from __future__ import annotations

import logging
import os

import ray

from pipeline.config import ConfigError
from pipeline.job.progress import log

# Ray kills idle worker processes beyond one per CPU after 1 s; decode tasks come in bursts as the
# workers consume, so the processes that ran them (with pyarrow, PIL and torch imported) died between
# bursts and the next block waited ~2 s for a cold one. A local instance keeps them 30 s.
LOCAL_IDLE_WORKER_KILL_MS = "30000"


def init_ray(num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster at RAY_ADDRESS, else start a local instance (no dashboard; `num_cpus`
    None = the machine's); the cluster's resources, without the per-node entries."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            raise ConfigError(f"RAY_ADDRESS={address} is a job server's address (for `ray job submit`); a run "
                              "joins a cluster at its GCS address, e.g. RAY_ADDRESS=<head-ip>:6379")
        if address:
            log(f"connecting to the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", LOCAL_IDLE_WORKER_KILL_MS)
            log("starting a local Ray instance")
            ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=num_cpus)
    return {k: float(v) for k, v in ray.cluster_resources().items() if "node:" not in k}




def quiet_ray_data() -> None:
    """The driver prints its own progress; Ray Data's bars and start-up notices would only repeat it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
