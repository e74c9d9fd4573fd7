"""Starting or joining Ray: the one place the job calls `ray.init`.

A run joins the cluster at RAY_ADDRESS (inside `ray job submit` Ray sets it), else starts a local
instance for this driver alone. What the local instance exposes is decided here (Ray 2.60):
- every process binds 127.0.0.1 only: the node's address is the loopback address
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which makes Ray's `get_node_ip_address` answer
  127.0.0.1, as it does on a laptop; the C++ servers and the agents bind the node address);
- the per-node dashboard agent starts `--minimal` (what Ray does when `ray[default]` is absent):
  no HTTP server, so no job API (`POST /api/job_agent/jobs/` runs its entrypoint) and no gRPC
  server; `include_dashboard=False` alone keeps both;
- token authentication is on with a fresh random token for this instance (`RAY_AUTH_TOKEN`, in
  this driver's environment only): a local user who is not this one cannot talk to the GCS, the
  raylet, the workers or the runtime-env agent (HTTP 401) over loopback.
What remains listening, all on 127.0.0.1: the gRPC ports (token required), the runtime-env agent
(token required) and the Prometheus metrics exporter (read-only `GET /metrics`).
"""
from __future__ import annotations

import logging
import os
import secrets

import ray

from pipeline.config import ConfigError
from pipeline.job.progress import log

# Ray kills idle worker processes beyond one per CPU after 1 s; decode tasks come in bursts as the
# workers consume, so the processes that ran them (with pyarrow, PIL and torch imported) died between
# bursts and the next block waited ~2 s for a cold one. A local instance keeps them 30 s.
LOCAL_IDLE_WORKER_KILL_MS = "30000"
_started_local = False  # whether this process started the instance it is connected to


def init_ray(num_cpus: int | None = None) -> dict[str, float]:
    """Join the cluster at RAY_ADDRESS, else start a local instance (loopback only, no HTTP API,
    token auth; `num_cpus` None = the machine's); the cluster's resources, without the per-node entries."""
    global _started_local
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):
            raise ConfigError(f"RAY_ADDRESS={address} is a job server's address (for `ray job submit`); a run "
                              "joins a cluster at its GCS address, e.g. RAY_ADDRESS=<head-ip>:6379")
        if address:
            log(f"connecting to the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", LOCAL_IDLE_WORKER_KILL_MS)
            log("starting a local Ray instance")
            with _closed_local_instance():
                ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=num_cpus)
            _started_local = True
    return {k: float(v) for k, v in ray.cluster_resources().items() if "node:" not in k}


def started_local() -> bool:
    """Whether this driver started the Ray instance it is connected to (and so must stop it)."""
    return _started_local and ray.is_initialized()


def shutdown_local() -> None:
    """Stop the local instance this driver started (its raylet, GCS, agents and workers); a
    cluster the driver joined is left alone."""
    global _started_local
    if started_local():
        ray.shutdown()
    _started_local = False


class _closed_local_instance:
    """Settings for the processes `ray.init` starts; the driver's own lookups are restored after."""

    def __enter__(self) -> None:
        import ray._private.ray_constants as constants
        import ray._private.utils as utils
        from ray._raylet import AuthenticationTokenLoader, Config

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the children: node address 127.0.0.1
        os.environ["RAY_AUTH_MODE"] = "token"
        if not os.environ.get("RAY_AUTH_TOKEN"):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        Config.initialize("")  # the driver's cached RayConfig sees token mode
        AuthenticationTokenLoader.instance().reset_cache()
        self.saved = (constants.ENABLE_RAY_CLUSTER, utils.get_dashboard_dependency_error)
        constants.ENABLE_RAY_CLUSTER = False  # the driver: node address 127.0.0.1
        # start_raylet adds `--minimal` to the dashboard agent's command when this reports an error
        utils.get_dashboard_dependency_error = lambda: ImportError("the job's local instance runs no dashboard")

    def __exit__(self, *exc: object) -> None:
        import ray._private.ray_constants as constants
        import ray._private.utils as utils

        constants.ENABLE_RAY_CLUSTER, utils.get_dashboard_dependency_error = self.saved


def quiet_ray_data() -> None:
    """The driver prints its own progress; Ray Data's bars and start-up notices would only repeat it."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
