"""Multi-process start-up: `jax.distributed.initialize` when a run spans several processes.

Call `initialize()` first thing in an entry point, before any JAX computation. It connects when

  * an explicit coordinator is given (`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`),
    e.g. several processes on one machine, or a launcher that sets them; or
  * the environment is a multi-process cluster JAX can read by itself: SLURM with more than one task,
    or a multi-host Cloud TPU slice.

Otherwise the run is single-process and nothing happens. A coordinator that cannot be reached within
`timeout_s` is reported with its address instead of a bare gRPC error.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import jax


def cluster_detected() -> bool:
    """True in a multi-process SLURM job or a multi-host TPU slice."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            last = e
            time.sleep(0.5)
    raise RuntimeError(
        f"process {process_id} could not join {address} within {timeout_s}s: nothing accepts connections there "
        f"({last}). Check that process 0 is running with the same --coordinator_address, that the host and "
        "port are reachable from this machine, and that no firewall blocks the port."
    )


HEARTBEAT_TIMEOUT_S = 60  # JAX's default is 100 s


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> bool:
    """Join the process group if this is a multi-process run. Returns True when it did.

    A lost process (killed, crashed, its host gone) stops sending heartbeats to JAX's coordination
    service. After `heartbeat_timeout_s` the service declares it unhealthy and every other process is
    terminated (exit status -6, SIGABRT) with a message naming the lost task ("The following tasks
    are unhealthy (stopped sending heartbeats): 1"), instead of waiting in a collective forever. A
    rerun of all processes resumes from the last complete checkpoint."""
    if coordinator_address is None and not cluster_detected():
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    where = coordinator_address or "the coordinator from the cluster environment"
    if coordinator_address is not None and process_id != 0:
        # JAX's client aborts the whole process (a C++ fatal error) when the coordinator never answers,
        # so check that it is reachable first and fail with a message that says where and what.
        _wait_for_coordinator(coordinator_address, process_id, timeout_s)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except Exception as e:  # gRPC deadline, refused connection, bad topology: say where and what
        raise RuntimeError(
            f"process {process_id if process_id is not None else '?'} could not join {where} within {timeout_s}s: {e}. "
            "Check that process 0 is running, the address/port are reachable from this host, and all "
            "processes agree on --num_processes."
        ) from e
    return True
