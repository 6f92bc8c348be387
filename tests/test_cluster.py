"""Cluster launcher configs: valid for Ray's own validator (offline) and safe by construction."""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
util = pytest.importorskip("ray.autoscaler._private.util")

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "cluster"
CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))

# Ports that must never face the internet: dashboard + job API, Ray Client, GCS.
PRIVATE_PORTS = (8265, 10001, 6379)


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it touches a cloud: fill defaults, then check the schema."""
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    return prepared


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"gpu.yaml", "local.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validator(path: Path):
    config = yaml.safe_load(path.read_text())
    prepared = _validate(config)
    head = "\n".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    (port,) = re.findall(r"--dashboard-port=(\d+)", head)
    assert f"export RAY_API_SERVER_ADDRESS=http://127.0.0.1:{port};" in head  # the head's own State API
    assert prepared["file_mounts"], "the working tree should be synced to the nodes"
    assert prepared["file_mounts"] == {"~/fvae-src": "."}
    assert any(c.startswith("~/venv/bin/pip install -q -e ~/fvae-src ") for c in prepared["setup_commands"])


@pytest.mark.parametrize(
    ("name", "breakage"),
    [
        ("gpu.yaml", "misspelt top-level key"),
        ("local.yaml", "misspelt top-level key"),
        ("gpu.yaml", "unknown node-type field"),
        ("gpu.yaml", "unknown head node type"),
        ("gpu.yaml", "negative resource"),
    ],
)
def test_broken_copy_fails_validation(name: str, breakage: str):
    config = _load(name)
    _validate(copy.deepcopy(config))  # the intact file passes...
    if breakage == "misspelt top-level key":
        config["setup_comands"] = config.pop("setup_commands")
    elif breakage == "unknown node-type field":
        config["available_node_types"]["gpu"]["min_worker"] = 1
    elif breakage == "unknown head node type":
        config["head_node_type"] = "no_such_type"
    elif breakage == "negative resource":
        config["available_node_types"]["gpu"]["resources"]["GPU"] = -1
    with pytest.raises((jsonschema.ValidationError, ValueError)):  # ...the broken copy does not
        _validate(config)


# ------------------------------------------------------------------ gpu.yaml


def test_gpu_head_has_no_gpu():
    config = _validate(_load("gpu.yaml"))
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p", "inf", "trn", "dl"))
    assert "--num-gpus=0" in "\n".join(config["head_start_ray_commands"])


def test_gpu_workers_autoscale_from_zero():
    config = _validate(_load("gpu.yaml"))
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] >= 1
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
    spot = [v for v in workers.values() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "a spot worker type should be available"
    provider = config["provider"]
    assert provider["type"] == "aws" and provider["region"] == "us-west-2"
    assert isinstance(provider["cache_stopped_nodes"], bool)


def _world_open_private_ports(config: dict[str, Any]) -> list[tuple[int, str]]:
    """(port, cidr) for every security-group rule that exposes a private port to the internet."""
    rules = config["provider"].get("security_group", {}).get("IpPermissions", []) or []
    hits = []
    for rule in rules:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        world = [c for c in cidrs if ipaddress.ip_network(c, strict=False).prefixlen == 0]
        if not world:
            continue
        all_ports = str(rule.get("IpProtocol")) == "-1" or rule.get("FromPort", -1) == -1
        for port in PRIVATE_PORTS:
            if all_ports or rule["FromPort"] <= port <= rule["ToPort"]:
                hits += [(port, c) for c in world]
    return hits


def test_gpu_security_group_keeps_dashboard_private():
    config = _validate(_load("gpu.yaml"))
    assert _world_open_private_ports(config) == []
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"], "document and check a custom group first"


def test_world_open_rule_is_detected():
    """The check above can fail: a rule opening the dashboard to everyone is caught."""
    config = _load("gpu.yaml")
    config["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
    ]
    assert _world_open_private_ports(_validate(config)) == [(8265, "0.0.0.0/0")]


# ------------------------------------------------------------------ local.yaml


def test_local_is_on_premise():
    raw = _load("local.yaml")
    provider = raw["provider"]
    assert provider["type"] == "local"
    ipaddress.ip_address(provider["head_ip"])
    assert provider["worker_ips"] and all(ipaddress.ip_address(ip) for ip in provider["worker_ips"])
    assert provider["head_ip"] not in provider["worker_ips"]
    assert raw["auth"]["ssh_user"] and raw["auth"]["ssh_private_key"]
    config = _validate(raw)
    (node_type,) = config["available_node_types"].values()
    assert node_type["max_workers"] == len(provider["worker_ips"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "--num-gpus=$(nvidia-smi" in "\n".join(config[key])
    # the head checks it can log in to every worker, so that a bad worker IP fails `ray up` at once
    assert raw["head_setup_commands"] == ["~/venv/bin/python -m fvae.cluster check-workers ~/ray_bootstrap_config.yaml"]


# ------------------------------------------------------------------ rendering (python -m fvae.cluster render)


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fvae.cluster", "render", *args], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_render_local_for_two_hosts(tmp_path: Path):
    out = tmp_path / "mine.yaml"
    torch = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    r = _render("cluster/local.yaml", "--out", str(out), "--head-ip", "10.0.0.1", "--worker-ips", "10.0.0.2",
                "--ssh-user", "alice", "--ssh-key", "~/.ssh/fvae_cluster", "--torch", torch, "--cluster-name", "lab")
    assert r.returncode == 0, r.stderr
    rendered, template = yaml.safe_load(out.read_text()), _load("local.yaml")
    assert rendered["provider"] == {**template["provider"], "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2"]}
    assert rendered["auth"] == {"ssh_user": "alice", "ssh_private_key": "~/.ssh/fvae_cluster"}
    assert rendered["cluster_name"] == "lab"
    changed = [(a, b) for a, b in zip(template["setup_commands"], rendered["setup_commands"]) if a != b]
    assert changed == [("~/venv/bin/pip install -q torch==2.13.0", f"~/venv/bin/pip install -q {torch}")]
    same = {"provider", "auth", "cluster_name", "setup_commands"}
    assert {k: v for k, v in rendered.items() if k not in same} == {k: v for k, v in template.items() if k not in same}
    assert out.read_text().startswith("# Rendered from cluster/local.yaml by")
    _validate(rendered)
    # a head alone (no workers) is a valid on-premise cluster with no worker slots
    r = _render("cluster/local.yaml", "--out", str(out), "--head-ip", "127.0.0.1", "--worker-ips", "")
    assert r.returncode == 0, r.stderr
    (node_type,) = _validate(yaml.safe_load(out.read_text()))["available_node_types"].values()
    assert node_type["max_workers"] == 0


def test_render_gpu_changes_only_the_torch_build(tmp_path: Path):
    out = tmp_path / "gpu.yaml"
    r = _render("cluster/gpu.yaml", "--out", str(out), "--torch", "torch==2.13.0 --index-url https://x/whl/cu128")
    assert r.returncode == 0, r.stderr
    rendered, template = yaml.safe_load(out.read_text()), _load("gpu.yaml")
    assert {k: v for k, v in rendered.items() if k != "setup_commands"} == \
        {k: v for k, v in template.items() if k != "setup_commands"}
    assert "~/venv/bin/pip install -q torch==2.13.0 --index-url https://x/whl/cu128" in rendered["setup_commands"]
    _validate(rendered)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cluster/local.yaml", "--worker-ips", ""], "needs --head-ip and --worker-ips"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1"], "needs --head-ip and --worker-ips"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1;rm", "--worker-ips", ""], "--head-ip: expected an IP"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1", "--worker-ips", "10.0.0.1"], "not the head"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1", "--worker-ips", "10.0.0.2,,10.0.0.3"], "--worker-ips"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1", "--worker-ips", "", "--ssh-user", "Bob Smith"], "--ssh-user"),
        (["cluster/local.yaml", "--head-ip", "10.0.0.1", "--worker-ips", "", "--torch", "--index-url x torch"],
         "--torch: expected pip arguments that start with the torch requirement"),
        (["cluster/gpu.yaml", "--head-ip", "10.0.0.1"], "only for provider type 'local'"),
        (["cluster/no_such.yaml"], "cannot read"),
    ],
)
def test_render_rejects_bad_input_in_one_line(tmp_path: Path, args: list[str], expected: str):
    out = tmp_path / "out.yaml"
    r = _render(*args, "--out", str(out))
    assert r.returncode == 2 and not out.exists()
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line


def test_render_never_overwrites_the_template(tmp_path: Path):
    template = tmp_path / "local.yaml"
    template.write_text((CLUSTER_DIR / "local.yaml").read_text())
    r = _render(str(template), "--out", str(template), "--head-ip", "10.0.0.1", "--worker-ips", "")
    assert r.returncode == 2 and "is the template itself" in r.stderr
    assert template.read_text() == (CLUSTER_DIR / "local.yaml").read_text()


# ------------------------------------------------------------------ live: `ray up` on this machine over SSH
#
# What a user with two machines does (README, "Clusters"), on loopback: an SSH server on 127.0.0.1, a
# throwaway unprivileged user to log in as, `ray up` of the rendered local.yaml, the smoke search
# through the `ray dashboard` tunnel and `ray job submit`, `ray down`. The cluster runs as that other user because its start commands
# run `ray stop`, which signals every Ray process it is allowed to: as another user it can only reach
# its own, so the suite's Ray cluster (and anyone else's) is out of its reach; the test checks that.

PROBE_MARK = "FVAE_PROBE "
# Runs on the head through `ray exec`: which fvae, torch and Ray the setup commands installed, and the
# resources the head's Ray reports. The digest covers fvae's sources as the head imports them.
PROBE = """
import hashlib, importlib.metadata as md, json, sys
from pathlib import Path
import fvae, ray, torch
pkg = Path(fvae.__file__).parent
digest = hashlib.sha256(b"".join(p.relative_to(pkg).as_posix().encode() + p.read_bytes()
                                 for p in sorted(pkg.rglob("*.py")))).hexdigest()
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
print("FVAE_PROBE " + json.dumps({
    "python": sys.executable, "fvae_dir": str(pkg), "fvae_version": md.version("fvae"), "digest": digest,
    "direct_url": json.loads(md.distribution("fvae").read_text("direct_url.json") or "{}"),
    "ray": ray.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
    "resources": ray.cluster_resources()}))
"""


def _sources_digest(pkg: Path) -> str:
    import hashlib

    return hashlib.sha256(b"".join(p.relative_to(pkg).as_posix().encode() + p.read_bytes()
                                   for p in sorted(pkg.rglob("*.py")))).hexdigest()


@dataclass(frozen=True)
class LoopbackHost:
    user: str  # the throwaway login; the cluster's Ray runs as this user
    home: Path
    key: Path  # the user's private key, on the `ray up` side (root's, 0600)
    port: int  # the SSH server's port on 127.0.0.1
    root: Path  # everything the fixture made; removed at the end
    bin: Path  # holds `ssh` for the `ray` CLI: OpenSSH with -p PORT (a real host listens on 22)
    server_pid: int  # the SSH server's listener, which outlives every cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _processes_of(user: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["username"]) if p.info["username"] == user]


SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
AllowUsers {user}
AllowTcpForwarding local
X11Forwarding no
PrintMotd no
# Ray keeps its sessions and the local provider's state file in $TMPDIR/ray (default /tmp/ray): on a
# real host that is the host's own; here it must not be shared with this machine's other Ray users.
SetEnv TMPDIR={home}/t
LogLevel VERBOSE
"""


@pytest.fixture(scope="module")
def loopback_host():
    """An SSH server on 127.0.0.1 (throwaway host key) that lets a throwaway unprivileged user in
    with a throwaway key: the "remote machine" of `ray up`."""
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        pytest.skip("no SSH server to bring a cluster up over: install Debian's openssh-server (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip(f"a throwaway user for the cluster needs root (useradd, sshd); this suite runs as uid "
                    f"{os.geteuid()}, and `ray stop` as this user would stop the suite's own Ray")
    missing = [t for t in ("ssh", "ssh-keygen", "rsync", "useradd", "userdel", "runuser") if not shutil.which(t)]
    if missing:
        pytest.skip(f"`ray up` over SSH needs {', '.join(missing)} (.ci/run installs openssh-server and rsync)")
    root = Path(tempfile.mkdtemp(prefix="fvc-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    root.chmod(0o755)
    user, home = f"fvc{secrets.token_hex(3)}", root / "h"
    created, server = False, None
    try:
        # password '*': no password login, but not a locked account (sshd without PAM refuses locked ones)
        r = subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                            "--user-group", "--password", "*", user], check=False, capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot create a throwaway user for the cluster: {r.stderr.strip()}")
        created = True
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", user, "-f", str(root / name)],
                           check=True, capture_output=True)
        pw = pwd.getpwnam(user)
        for d, mode in ((home / ".ssh", 0o700), (home / "t", 0o700)):
            d.mkdir(mode=mode)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        keys = home / ".ssh" / "authorized_keys"
        keys.write_text((root / "user_key.pub").read_text())
        keys.chmod(0o600)
        os.chown(keys, pw.pw_uid, pw.pw_gid)
        port = _free_port()
        config = root / "sshd_config"
        config.write_text(SSHD_CONFIG.format(port=port, root=root, user=user, home=home))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        check = subprocess.run([sshd, "-t", "-f", str(config)], check=False, capture_output=True, text=True)
        if check.returncode:
            pytest.skip(f"the SSH server does not start here: {check.stderr.strip()}")
        with open(root / "sshd.log", "w") as log:  # the server keeps its own copy of the descriptor
            server = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
        if not _wait_for_port(port, timeout=30):
            pytest.skip(f"the SSH server does not start here: {(root / 'sshd.log').read_text()[-500:]}")
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -p {port} "$@"\n')
        (bin_dir / "ssh").chmod(0o755)
        host = LoopbackHost(user=user, home=home, key=root / "user_key", port=port, root=root, bin=bin_dir,
                            server_pid=server.pid)
        # one login the way the launcher logs in, so that a broken server fails here, clearly
        r = _ssh(host, "id -un; echo $TMPDIR")
        assert r.returncode == 0 and r.stdout.split() == [user, str(home / "t")], \
            r.stdout + r.stderr + (root / "sshd.log").read_text()[-2000:]
        yield host
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if created:
            for p in _processes_of(user):
                p.kill()
            subprocess.run(["userdel", "--force", "--remove", user], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _ssh(host: LoopbackHost, command: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(host.bin / "ssh"), "-i", str(host.key), "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           f"{host.user}@127.0.0.1", command], check=False, capture_output=True, text=True,
                          timeout=timeout)


# What a seeded venv leaves out, for the setup commands to install themselves: the same Ray as the
# launcher's (its `ray` command too), fvae from the synced checkout, the venv's own packaging tools.
# torch is seeded: installing its CPU wheel from local disk takes minutes on this loaded machine; the
# torch line still runs and must accept the seeded build (2.13.0+cpu) for its `torch==2.13.0`.
SETUP_INSTALLS = ("ray", "fvae", "pip", "setuptools", "wheel")


def _link_tree(src: Path, dst: Path, uid: int, gid: int) -> int:
    """Hard links of ``src``'s files under ``dst`` (directories owned by uid, files left to root, so
    the cluster's user reads this suite's packages but cannot change them)."""
    if src.is_symlink() or not src.is_dir():
        os.symlink(os.readlink(src), dst) if src.is_symlink() else os.link(src, dst)
        return 1
    n = 0
    for dirpath, dirnames, filenames in os.walk(src):
        here = dst / Path(dirpath).relative_to(src)
        here.mkdir()
        os.chown(here, uid, gid)
        for name in [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            dirnames.remove(name)
            filenames.append(name)
        for name in filenames:
            n += _link_tree(Path(dirpath) / name, here / name, uid, gid)
    return n


def _seed_venv(host: LoopbackHost) -> str:
    """The head's ~/venv as after an earlier `ray up`: the first one installs ~2.5 GB of fvae's
    dependencies (5 minutes here), so the venv is made by the host's own python3 and given hard links
    of this suite's packages, except SETUP_INSTALLS, which the setup commands then install for real."""
    r = _ssh(host, "python3 -c 'import sys; print(*sys.version_info[:2])'")
    theirs, ours = r.stdout.split(), [str(v) for v in sys.version_info[:2]]
    if theirs != ours:
        return f"not seeded (the host's python3 is {'.'.join(theirs)}, this suite's {'.'.join(ours)})"
    r = _ssh(host, "python3 -m venv ~/venv")
    assert r.returncode == 0, f"python3 -m venv failed on the host (Debian: python3-venv): {r.stderr}"
    skip = set()
    for name in SETUP_INSTALLS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        skip |= {f.parts[0] for f in files if f.parts[0] != ".."}
    site = Path(sysconfig.get_paths()["purelib"])
    dst = host.home / "venv" / "lib" / f"python{'.'.join(ours)}" / "site-packages"
    pw = pwd.getpwnam(host.user)
    n = sum(_link_tree(p, dst / p.name, pw.pw_uid, pw.pw_gid) for p in sorted(site.iterdir())
            if p.name not in skip and p.name != "__pycache__" and not (dst / p.name).exists())
    return f"seeded with {n} files of {site}"


RAY = [sys.executable, "-m", "ray.scripts.scripts"]
PORT_FLAG = re.compile(r"--([a-z-]*port)=(\d+)")
HEAD_CPUS, HEAD_OBJECT_STORE = 2, 256 * 1024 * 1024


def _share_this_machine(config: dict[str, Any]) -> dict[str, int]:
    """Free ports, bounded resources and patience instead of Ray's defaults: this machine also runs
    the suite's Ray cluster and other people's (a dedicated host keeps local.yaml's ports; edit them
    the same way on a shared one). Returns the new port of every ``--*-port`` flag, by flag."""
    ports: dict[str, int] = {}
    base = 20000 + secrets.randbelow(90) * 100  # worker ports: above Ray's default range, 200 wide
    fixed = {"min-worker-port": base, "max-worker-port": base + 199}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [PORT_FLAG.sub(lambda m: f"--{m[1]}={ports.setdefault(m[1], fixed.get(m[1]) or _free_port())}",
                                     c) for c in config[key]]
    config["worker_start_ray_commands"] = [c.replace(":6379", f":{ports['port']}")
                                           for c in config["worker_start_ray_commands"]]
    config["head_start_ray_commands"] = [c.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{ports['dashboard-port']}")
                                         for c in config["head_start_ray_commands"]]
    assert len(set(ports.values())) == len(ports), ports
    # RAY_raylet_start_wait_time_s: how long `ray start` waits for its raylet to register (30 s), which
    # a machine loaded many times over its cores can exceed
    config["head_start_ray_commands"] = [
        c.replace("ray start --head", f"RAY_raylet_start_wait_time_s=120 ray start --head --num-cpus={HEAD_CPUS} "
                                      f"--object-store-memory={HEAD_OBJECT_STORE}")
        for c in config["head_start_ray_commands"]]
    return ports


def _cli_env(host: LoopbackHost) -> dict[str, str]:
    """The `ray` CLI's environment: OpenSSH on the host's port, its own temp dir (the local provider's
    state file, the config cache), and none of the suite cluster's RAY_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    (host.root / "client-tmp").mkdir(exist_ok=True)
    env.update(PATH=f"{host.bin}:{env['PATH']}", TMPDIR=str(host.root / "client-tmp"),
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _ray(env: dict[str, str], *args: str, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """One `ray` CLI call; its output also goes to ``log`` (read it when the test fails)."""
    t0 = time.monotonic()
    r = subprocess.run([*RAY, *args], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=timeout)
    with open(log, "a") as f:
        f.write(f"\n$ ray {' '.join(args)}  # exit {r.returncode}, {time.monotonic() - t0:.0f} s\n{r.stdout}{r.stderr}")
    print(f"[cluster] ray {args[0]} {args[1] if len(args) > 1 else ''}: exit {r.returncode} "
          f"in {time.monotonic() - t0:.0f} s", flush=True)
    return r


def _ray_up(env: dict[str, str], config: Path, log: Path) -> subprocess.CompletedProcess:
    """`ray up -y`, run again (as a user would) if the head's Ray missed its fixed 30 s start-up
    window, which a machine loaded several times over its core count can make it do."""
    for attempt in range(1, 4):
        again = ["--restart-only"] if attempt > 1 else []  # the setup commands succeeded already
        up = _ray(env, "up", "-y", "-v", "--no-config-cache", *again, str(config), timeout=1200, log=log)
        if up.returncode == 0 or "timed out during startup" not in up.stdout + up.stderr:
            break
    assert up.returncode == 0, _tail(log)
    return up


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text()[-n:] if log.exists() else ""


@contextlib.contextmanager
def _dashboard_tunnel(env: dict[str, str], config: Path, remote_port: int, log: Path):
    """`ray dashboard CONFIG`: the SSH tunnel a user opens to reach the head's loopback-only dashboard."""
    local = _free_port()
    with open(log, "a") as f:
        f.write(f"\n$ ray dashboard --port {local} --remote-port {remote_port}\n")
        f.flush()
        tunnel = subprocess.Popen([*RAY, "dashboard", str(config), "--port", str(local), "--remote-port",
                                   str(remote_port)], env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=f,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_for_port(local, timeout=120), "ray dashboard opened no tunnel:\n" + _tail(log)
        yield f"http://127.0.0.1:{local}"
    finally:
        os.killpg(tunnel.pid, signal.SIGTERM)
        try:
            tunnel.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(tunnel.pid, signal.SIGKILL)


def _listening(user: str) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket the user's processes listen on."""
    import psutil

    procs = {p.pid: p.info["name"] for p in psutil.process_iter(["username", "name"]) if p.info["username"] == user}
    return sorted((c.laddr.ip, c.laddr.port, procs[c.pid]) for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in procs)


def _leftovers(host: LoopbackHost, *, timeout: float) -> list[str]:
    """Processes the cluster left: any of its user's, or any here that names the fixture's files (the
    `ray` CLI, SSH masters, which outlive their last session by ControlPersist=10s)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        left = [f"{p.pid} {p.info['username']}: {' '.join(p.info['cmdline'] or [])[:200]}"
                for p in psutil.process_iter(["username", "cmdline"])
                if p.pid not in (os.getpid(), host.server_pid) and (p.info["username"] == host.user
                                             or str(host.root) in " ".join(p.info["cmdline"] or []))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(2)


def _drop_ssh_control_dir(cluster_name: str) -> None:
    """Remove the folder `ray up` keeps its SSH master sockets in (/tmp/ray_ssh_<user>/<cluster>,
    hashes as in ray.autoscaler._private.command_runner), once the masters are gone."""
    import getpass
    import hashlib

    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:10]
    folder = Path("/tmp") / f"ray_ssh_{digest(getpass.getuser())}" / digest(cluster_name)
    for path in (folder, folder.parent):
        with contextlib.suppress(OSError):  # absent, or still in use (then not ours to remove)
            path.rmdir()


def _suite_ray_processes(ray_cluster: dict[str, str]) -> dict[int, float]:
    import psutil

    return {p.pid: p.create_time() for p in psutil.process_iter(["cmdline"])
            if ray_cluster["temp"] in " ".join(p.info["cmdline"] or [])}


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ray_up_on_loopback_runs_the_search_and_ray_down_cleans_up(loopback_host, ray_cluster, tmp_path):
    host, t_start = loopback_host, time.monotonic()
    log = tmp_path / "cluster.log"  # every `ray` call's output; pytest keeps it after a failure
    config_path = host.root / "cluster.yaml"
    r = _render("cluster/local.yaml", "--out", str(config_path), "--head-ip", "127.0.0.1", "--worker-ips", "",
                "--ssh-user", host.user, "--ssh-key", str(host.key), "--torch", "torch==2.13.0",
                "--cluster-name", f"fvae-{host.user}")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(config_path.read_text())
    ports = _share_this_machine(config)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000))
    _validate(config)
    print(f"[cluster] {_seed_venv(host)}", flush=True)
    shared = host.root / "shared"  # stands for storage every node mounts at the same path
    shared.mkdir()
    os.chown(shared, pwd.getpwnam(host.user).pw_uid, pwd.getpwnam(host.user).pw_gid)
    suite_before = _suite_ray_processes(ray_cluster)
    assert suite_before, "the suite's own Ray cluster should be running"
    env = _cli_env(host)
    try:
        up = _ray_up(env, config_path, log)
        # the address the head's `ray start` reports: its dashboard and job server, on its loopback
        reported = re.findall(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", up.stdout)
        assert reported and reported[-1] == f"http://127.0.0.1:{ports['dashboard-port']}", _tail(log)
        listening = _listening(host.user)
        print(f"[cluster] the head listens on {listening}", flush=True)
        dashboard = [ip for ip, port, _ in listening if port == ports["dashboard-port"]]
        assert dashboard and set(dashboard) == {"127.0.0.1"}, listening

        probe = _ray(env, "exec", str(config_path), "python -c " + shlex.quote(PROBE), timeout=300, log=log)
        lines = [ln for ln in probe.stdout.splitlines() if ln.startswith(PROBE_MARK)]
        assert probe.returncode == 0 and lines, _tail(log)
        head = json.loads(lines[-1][len(PROBE_MARK):])
        # the setup commands installed the checkout's fvae (editable, from what `ray up` synced), the
        # torch build the config names (the CPU one here) and the launcher's Ray, in ~/venv
        assert head["python"] == str(host.home / "venv" / "bin" / "python"), head
        assert head["fvae_dir"] == str(host.home / "fvae-src" / "fvae"), head
        assert head["direct_url"] == {"url": f"file://{host.home / 'fvae-src'}", "dir_info": {"editable": True}}, head
        assert head["digest"] == _sources_digest(ROOT / "fvae"), "the head runs other fvae sources than the checkout"
        assert head["fvae_version"] == importlib.metadata.version("fvae")
        assert head["ray"] == importlib.metadata.version("ray") and head["torch"].startswith("2.13.0") and head["cuda"] is None, head
        # resources as configured: the CPUs and object store given, GPUs as nvidia-smi counts them (none)
        res = head["resources"]
        assert res["CPU"] == HEAD_CPUS and res.get("GPU", 0) == 0, res
        assert abs(res["object_store_memory"] - HEAD_OBJECT_STORE) < 1024 * 1024, res

        exp = shared / "exp"
        with _dashboard_tunnel(env, config_path, ports["dashboard-port"], log) as address:
            job = _ray(env, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "-m",
                       "fvae.tune", "--space", "search_spaces/smoke.yaml", "--num-samples", "2", "--out", str(exp),
                       "--cpus-per-worker", "0.5",  # both trials at once on the head's 2 CPUs
                       timeout=900, log=log)
        assert job.returncode == 0 and "succeeded" in job.stdout.lower(), _tail(log)
        # every State API query on the head went to this cluster, not to one guessed among the host's
        assert "Found multiple active Ray instances" not in job.stdout, _tail(log)
        summary = json.loads((exp / "summary.json").read_text())
        assert len(summary["trials"]) == 2 and summary["best"]["test"]["rank_ic"] is not None, summary
        assert (exp / "summary.json").stat().st_uid == pwd.getpwnam(host.user).pw_uid  # written by the cluster
    finally:
        down = _ray(env, "down", "-y", str(config_path), timeout=300, log=log)
        left = _leftovers(host, timeout=60)
        _drop_ssh_control_dir(config["cluster_name"])
    assert down.returncode == 0, _tail(log)
    assert left == []
    # `ray stop` ran on the head twice (start commands, `ray down`) and could not reach the suite's Ray
    suite_after = _suite_ray_processes(ray_cluster)
    assert {pid: t for pid, t in suite_before.items() if suite_after.get(pid) == t} == suite_before
    print(f"[cluster] ray up -> job -> ray down on loopback: {time.monotonic() - t_start:.0f} s", flush=True)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\s")


def _logged_at(log_text: str, needle: str) -> float:
    """When Ray logged the last line holding ``needle`` (its own timestamps, in seconds)."""
    import datetime

    stamps = [LOG_TIME.match(ln) for ln in log_text.splitlines() if needle in ln]
    stamps = [m for m in stamps if m]
    assert stamps, f"no log line holds {needle!r}"
    return datetime.datetime.strptime(stamps[-1][1], "%Y-%m-%d %H:%M:%S").timestamp()


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_unreachable_worker_fails_ray_up_soon_and_names_the_host(loopback_host, tmp_path):
    """A worker IP that answers no SSH fails `ray up` at the head's check, within seconds, with one
    line that names the host; Ray's autoscaler alone would retry it for 15 minutes in silence."""
    host, unreachable = loopback_host, "203.0.113.1"  # TEST-NET-3 (RFC 5737): documentation only
    log, config_path = tmp_path / "cluster.log", host.root / "unreachable.yaml"
    r = _render("cluster/local.yaml", "--out", str(config_path), "--head-ip", "127.0.0.1",
                "--worker-ips", unreachable, "--ssh-user", host.user, "--ssh-key", str(host.key),
                "--torch", "torch==2.13.0", "--cluster-name", f"fvae-{host.user}-w")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(config_path.read_text())
    _share_this_machine(config)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False, width=1000))
    if not (host.home / "venv").exists():
        print(f"[cluster] {_seed_venv(host)}", flush=True)
    env = _cli_env(host)
    try:
        up = _ray(env, "up", "-y", "-v", "--no-config-cache", str(config_path), timeout=1200, log=log)
    finally:
        down = _ray(env, "down", "-y", str(config_path), timeout=300, log=log)
        left = _leftovers(host, timeout=60)
        _drop_ssh_control_dir(config["cluster_name"])
    out = up.stdout + up.stderr
    assert up.returncode != 0, _tail(log)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error: ") and "check-workers" not in ln]
    assert f"the head cannot log in over SSH to {unreachable} (" in line, line
    waited = _logged_at(out, "Failed to setup head node") - _logged_at(out, "fvae.cluster check-workers")
    assert waited <= 45, f"the check took {waited:.0f} s"  # one 10 s SSH timeout, plus a loaded machine
    assert "ray start" not in out.split("fvae.cluster check-workers")[-1]  # Ray never started
    assert down.returncode == 0, _tail(log)
    assert left == []


@pytest.mark.parametrize(("config", "expected"), [("cluster/gpu.yaml", "check-workers is for on-premise clusters"),
                                                  ("cluster/no_such.yaml", "not a readable on-premise cluster config")])
def test_check_workers_rejects_what_it_cannot_check(config: str, expected: str):
    r = subprocess.run([sys.executable, "-m", "fvae.cluster", "check-workers", config], check=False,
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and line.startswith("error: ") and expected in line, line
