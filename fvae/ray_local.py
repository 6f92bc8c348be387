"""A private local Ray cluster that lives exactly as long as the process that started it.

    python -m fvae.ray_local watch OWNER_PID TEMP_DIR     (internal: the watchdog ``start`` spawns)

``start`` runs ``ray start --head`` in a session of its own, on fresh ports and a fresh temp dir.
Every process of that cluster (GCS, raylet, dashboard and its modules, the agents, the workers,
whose command lines Ray rewrites to ``ray::IDLE``) inherits ``FVAE_RAY_CLUSTER=<temp dir>`` in its
environment, which is how ``processes`` finds them, with their descendants (Ray's renamed agents
may no longer show the marker), also the agents and workers that outlive a killed raylet. A watchdog in a session of its own polls the owner; once the owner is gone (it
exited, crashed or was killed with ``kill -9``) the watchdog stops every process of the cluster
and deletes the temp dir. Without it, ``kill -9`` of a driver that had started Ray with
``ray.init()`` leaves the DashboardAgent and the RuntimeEnvAgent running for good.

Start-up on a loaded machine: Ray waits a fixed 30 s for the raylet to register with the GCS
(``ray/_private/node.py``), the raylet 10 s for its agents and ``ray start`` 60 s for the
dashboard, which a machine whose load is several times its core count can miss. ``ray start``
runs here with all three stretched to ``startup_timeout_s`` (the first by wrapping Ray's private
``services.get_node``; without it, Ray's own 30 s apply); a start that still fails is retried on
fresh ports, and then reported as one :class:`RayStartError` that says what to do. Ray itself is
not imported here: the cluster is started by its command-line tool.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "FVAE_RAY_CLUSTER"
AUTH = "RAY_AUTH_MODE"  # the cluster and its drivers must agree on it

# `ray start`, with the raylet's registration wait stretched: Node.__init__ polls services.get_node
# until 30 s have passed; this get_node itself retries until `wait` seconds have.
_RAY_START = """
import sys, time
import ray._private.services as services
wait, get_node = float(sys.argv.pop(1)), getattr(services, "get_node", None)
def patient_get_node(*args, **kwargs):
    deadline = time.monotonic() + wait
    while True:
        try:
            return get_node(*args, **kwargs)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
if get_node is not None:
    services.get_node = patient_get_node
# token authentication (Ray's default for a local cluster): a token is made once, in ~/.ray/auth_token
from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
ensure_token_if_auth_enabled(None, create_token_if_missing=True)
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


class RayStartError(RuntimeError):
    """A local Ray cluster did not start, after every try."""


@dataclass(frozen=True)
class LocalCluster:
    address: str  # the GCS, for ray.init(address=...)
    dashboard: str  # http://127.0.0.1:PORT: the job server and the State API
    temp_dir: Path  # unique to this cluster: every one of its processes carries it (MARKER)
    watchdog: subprocess.Popen


def auth_mode() -> str:
    """RAY_AUTH_MODE if set, else "token": what ``ray.init()`` gives a local cluster it starts."""
    return os.environ.get(AUTH) or "token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Liveness on a loaded machine: the GCS marks a node dead after 5 missed health checks of 10 s each
# (3 s apart), and the node's raylet then exits, and with it every driver connected to it ("the local
# Raylet is dead", a SystemExit in the driver's next ray.wait). On a single machine a raylet that
# does not answer is starved, not gone, so it gets several minutes; a cluster whose owner is gone
# is still stopped at once by the watchdog.
_LIVENESS = {"RAY_health_check_timeout_ms": "30000", "RAY_health_check_failure_threshold": "12",
             "RAY_gcs_rpc_server_reconnect_timeout_s": "300"}


def _start_env(temp: Path, wait_s: float) -> dict[str, str]:
    """The environment of ``ray start``, which every process of the cluster inherits: the marker, the
    authentication mode, Ray's start-up waits stretched to ``wait_s`` (the raylet's wait for its
    agents' ports, 10 s by default; the wait for the dashboard, 60 s) and its liveness checks
    stretched (``_LIVENESS``); a setting already in the environment is kept."""
    return {**_LIVENESS, **os.environ, MARKER: str(temp), AUTH: auth_mode(),
            "RAY_raylet_start_wait_time_s": str(int(wait_s)), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(int(wait_s))}


def _spawn_watchdog(owner: int, temp: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen([sys.executable, "-m", "fvae.ray_local", "watch", str(owner), str(temp)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # survives a kill of the owner's process group


def start(*, num_cpus: int, object_store_mb: int = 256, tries: int = 3, startup_timeout_s: float = 120.0,
          owner: int | None = None) -> LocalCluster:
    """A fresh single-node cluster with ``num_cpus`` logical CPUs, a bounded object store and the
    dashboard on loopback, stopped by a watchdog once ``owner`` (default: this process) is gone."""
    errors = []
    for attempt in range(1, tries + 1):
        temp = Path(tempfile.mkdtemp(prefix="fvae-ray-", dir="/tmp"))  # short: socket paths have a length limit
        watchdog = _spawn_watchdog(owner or os.getpid(), temp)
        # fresh ports for all that Ray would otherwise take at a fixed default (GCS 6379, dashboard 8265,
        # Ray Client 10001, the dashboard agent's HTTP 52365, where the job server submits jobs): a
        # second cluster on the machine would find them taken
        gcs, dash, client, agent = _free_port(), _free_port(), _free_port(), _free_port()
        t0 = time.monotonic()
        cmd = [sys.executable, "-c", _RAY_START, str(startup_timeout_s), "start", "--head", f"--port={gcs}",
               f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_mb * 1024 * 1024}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--temp-dir={temp}", "--disable-usage-stats"]
        try:
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=startup_timeout_s + 120,
                                 env=_start_env(temp, startup_timeout_s), start_new_session=True)
            if out.returncode == 0:
                return LocalCluster(address=_gcs_address(out.stdout + out.stderr, gcs),
                                    dashboard=f"http://127.0.0.1:{dash}", temp_dir=temp, watchdog=watchdog)
            lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
            errors.append(f"try {attempt}, after {time.monotonic() - t0:.0f} s: "
                          f"{lines[-1][:300] if lines else f'exit {out.returncode}'}")
        except subprocess.TimeoutExpired:
            errors.append(f"try {attempt}: no answer in {startup_timeout_s + 120:.0f} s")
        _stop(temp, watchdog)
        if attempt < tries:
            time.sleep(5 * attempt)
    raise RayStartError(f"a local Ray cluster did not start ({'; '.join(errors)}); the machine may be too loaded: "
                        "reduce its load, or start a cluster with `ray start --head` and pass its address "
                        "(--address HOST:PORT)")


def _gcs_address(output: str, port: int) -> str:
    for line in output.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # ray colours its output
        if "ray start --address=" in line:
            return line.split("--address=")[1].split()[0].strip("'\"")
    return f"127.0.0.1:{port}"


def processes(temp: Path) -> list[Any]:
    """Every live process of the cluster whose temp dir is ``temp`` (psutil.Process objects): those
    whose environment carries the marker, and all their descendants. The descendants are needed
    because Ray renames its agents and dashboard modules (``ray::DashboardAgent``) with
    setproctitle, which can overwrite the environment block that /proc/PID/environ reads."""
    import psutil

    tag = str(temp)
    found: dict[int, Any] = {}
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == tag:
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return [p for p in found.values() if _alive(p)]


def _alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(temp: Path, *, grace_s: float = 2.0, timeout_s: float = 30.0, calm_s: float = 1.0) -> None:
    """SIGTERM every process of the cluster, SIGKILL what is left after ``grace_s``, until none is
    found for ``calm_s`` (a raylet may start a worker or an agent meanwhile); then delete the temp
    dir. A process seen once stays on the list: an agent orphaned by its raylet is no longer a
    descendant of a marked process, and its own marker may be unreadable (``processes``)."""
    import psutil

    def signal_all(found: list[Any], sig: int) -> None:
        for p in found:
            try:
                p.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    seen = {p.pid: p for p in processes(temp)}
    signal_all(list(seen.values()), signal.SIGTERM)
    psutil.wait_procs(list(seen.values()), timeout=grace_s)
    deadline, calm_since = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        seen.update((p.pid, p) for p in processes(temp))
        found = [p for p in seen.values() if _alive(p)]
        signal_all(found, signal.SIGKILL)
        now = time.monotonic()
        calm_since = None if found else (calm_since or now)
        if calm_since is not None and now - calm_since >= calm_s:
            break
        time.sleep(0.2)
    shutil.rmtree(temp, ignore_errors=True)


def _stop(temp: Path, watchdog: subprocess.Popen) -> None:
    kill(temp)
    if watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()


def stop(cluster: LocalCluster) -> None:
    """Stop the cluster now (disconnect drivers first) and its watchdog."""
    _stop(cluster.temp_dir, cluster.watchdog)


def watch(owner: int, temp: Path, *, poll_s: float = 0.5) -> None:
    """Wait for ``owner`` to be gone, then stop the cluster of ``temp``."""
    import psutil

    try:
        proc = psutil.Process(owner)  # is_running() compares its start time: a reused pid is not the owner
    except psutil.NoSuchProcess:
        proc = None
    while proc is not None and _alive(proc):
        time.sleep(poll_s)
    kill(temp)


def sigterm_as_sigint() -> None:
    """Treat SIGTERM like Ctrl-C (SIGINT): Tune then stops its trials and saves its state, and the
    process exits through its normal clean-up (which stops a cluster it started)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "watch":
        sys.exit("usage: python -m fvae.ray_local watch OWNER_PID TEMP_DIR")
    watch(int(sys.argv[2]), Path(sys.argv[3]))
