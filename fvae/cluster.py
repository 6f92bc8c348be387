"""Fill in a cluster launcher config for your machines: ``cluster/*.yaml`` -> a file for ``ray up``.

    python -m fvae.cluster render cluster/local.yaml --out cluster/mine.yaml \\
        --head-ip 10.0.0.1 --worker-ips 10.0.0.2,10.0.0.3 --ssh-user fvae --ssh-key ~/.ssh/fvae_cluster \\
        [--torch "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"] [--cluster-name NAME]
    python -m fvae.cluster check-workers ~/ray_bootstrap_config.yaml     # on the head: a setup command

The templates stay valid configs with example values; rendering replaces the per-cluster ones
(the hosts, the SSH login, which torch build the setup commands install, the cluster's name)
and leaves every other line as it is. ``--torch`` takes the pip arguments of the setup command
that installs torch before fvae, so a CPU host never downloads the CUDA build and a GPU host
gets the CUDA version its driver supports.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fvae.io import atomic_write_text

# The setup command that installs torch before fvae (so that fvae's `torch>=...` is already met).
TORCH_COMMAND = "~/venv/bin/pip install -q "
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^[0-9A-Fa-f:]+$")


class RenderError(ValueError):
    """A template or an option that cannot make a valid config; the message names which."""


def _host(option: str, value: str) -> str:
    if not _HOST.match(value):
        raise RenderError(f"{option}: expected an IP address or host name, got {value!r}")
    return value


def _torch_index(path: str, commands: list[str]) -> int:
    hits = [i for i, c in enumerate(commands) if c.startswith(TORCH_COMMAND + "torch")]
    if len(hits) != 1:
        raise RenderError(f"{path}: setup_commands: expected exactly one '{TORCH_COMMAND}torch...' command "
                          f"(the torch build), found {len(hits)}")
    return hits[0]


def render(template: dict[str, Any], *, path: str = "config", head_ip: str | None = None,
           worker_ips: list[str] | None = None, ssh_user: str | None = None, ssh_key: str | None = None,
           torch: str | None = None, cluster_name: str | None = None) -> dict[str, Any]:
    """A copy of ``template`` with the given per-cluster values; the others are left as they are."""
    config = yaml.safe_load(yaml.safe_dump(template))  # deep copy, plain types
    provider = config.get("provider", {})
    if provider.get("type") == "local":
        if head_ip is None or worker_ips is None:
            raise RenderError(f"{path}: an on-premise cluster needs --head-ip and --worker-ips "
                              "(--worker-ips '' for a head node alone)")
        provider["head_ip"] = _host("--head-ip", head_ip)
        provider["worker_ips"] = [_host("--worker-ips", ip) for ip in worker_ips]
        if head_ip in worker_ips or len(set(worker_ips)) != len(worker_ips):
            raise RenderError(f"--worker-ips: each host once, and not the head {head_ip}: {worker_ips}")
    elif head_ip is not None or worker_ips is not None:
        raise RenderError(f"--head-ip/--worker-ips: only for provider type 'local'; {path} has "
                          f"{provider.get('type')!r}, whose provider starts the machines")
    if ssh_user is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_-]*", ssh_user):
            raise RenderError(f"--ssh-user: expected a Linux user name, got {ssh_user!r}")
        config.setdefault("auth", {})["ssh_user"] = ssh_user
    if ssh_key is not None:
        config.setdefault("auth", {})["ssh_private_key"] = ssh_key
    if torch is not None:
        if not torch.startswith("torch") or "\n" in torch:
            raise RenderError(f"--torch: expected pip arguments that start with the torch requirement, "
                              f"e.g. 'torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu', got {torch!r}")
        commands = config.get("setup_commands", [])
        commands[_torch_index(path, commands)] = TORCH_COMMAND + torch
    if cluster_name is not None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", cluster_name):
            raise RenderError(f"--cluster-name: expected letters, digits, '-' or '_', got {cluster_name!r}")
        config["cluster_name"] = cluster_name
    return config


def render_file(template: Path, out: Path, *, argv: list[str], **values: Any) -> Path:
    """Render ``template`` into ``out`` (written whole or not at all), headed by how it was made."""
    if out.resolve() == template.resolve():
        raise RenderError(f"--out: {out} is the template itself; write the rendered config elsewhere")
    try:
        raw = yaml.safe_load(template.read_text())
    except OSError as e:
        raise RenderError(f"{template}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RenderError(f"{template}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or "provider" not in raw:
        raise RenderError(f"{template}: expected a Ray cluster config (a mapping with 'provider:')")
    config = render(raw, path=str(template), **values)
    header = (f"# Rendered from {template} by\n#   python -m fvae.cluster {shlex.join(argv)}\n"
              f"# Edit the template and render again; its comments explain every field.\n")
    return atomic_write_text(out, header + yaml.safe_dump(config, sort_keys=False, width=1000))


def check_workers(config: dict[str, Any], *, timeout_s: int = 10) -> list[str]:
    """Log in to every worker of an on-premise config the way the head's autoscaler will; returns
    "IP (why)" for each worker that did not let the head in within ``timeout_s``. Ray itself retries
    an unreachable worker for 15 minutes without a word to ``ray up``; run on the head as a setup
    command, this makes ``ray up`` fail at once and name the host."""
    auth, ips = config["auth"], config["provider"].get("worker_ips", [])
    key = ["-i", str(Path(auth["ssh_private_key"]).expanduser())] if auth.get("ssh_private_key") else []
    options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
    logins = {ip: subprocess.Popen(["ssh", *key, *options, f"{auth['ssh_user']}@{ip}", "true"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True) for ip in ips}  # all at once: the wait is one timeout
    failed = []
    for ip, login in logins.items():
        try:
            _, err = login.communicate(timeout=timeout_s + 20)  # + the key exchange on a slow host
        except subprocess.TimeoutExpired:
            login.kill()
            err = f"no answer in {timeout_s + 20} s"
        if login.returncode != 0:
            reason = (err.strip().splitlines() or [f"ssh exit {login.returncode}"])[-1]
            failed.append(f"{ip} ({reason})")
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fvae.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="fill in a cluster/*.yaml template for your machines")
    r.add_argument("template", type=Path, help="e.g. cluster/local.yaml")
    r.add_argument("--out", type=Path, required=True, help="the config to pass to `ray up`")
    r.add_argument("--head-ip", default=None, help="on-premise: the head host")
    r.add_argument("--worker-ips", default=None, help="on-premise: worker hosts, comma-separated ('' for none)")
    r.add_argument("--ssh-user", default=None, help="the Linux user `ray up` logs in as on every host")
    r.add_argument("--ssh-key", default=None, help="its private key on the machine that runs `ray up`")
    r.add_argument("--torch", default=None, help="pip arguments for the torch build, e.g. "
                   "'torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'")
    r.add_argument("--cluster-name", default=None)
    c = sub.add_parser("check-workers", help="on the head: fail unless it can log in to every worker over SSH")
    c.add_argument("config", type=Path, help="the cluster config; on the head ~/ray_bootstrap_config.yaml")
    c.add_argument("--timeout", type=int, default=10, help="seconds to wait for each worker's SSH server")
    return p


def _check_workers_main(args: argparse.Namespace) -> int:
    try:
        config = yaml.safe_load(args.config.expanduser().read_text())
        if config["provider"].get("type") != "local":
            print(f"error: {args.config}: provider.type: check-workers is for on-premise clusters ('local'), "
                  f"not {config['provider'].get('type')!r}", file=sys.stderr)
            return 2
        failed = check_workers(config, timeout_s=args.timeout)
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        print(f"error: {args.config}: not a readable on-premise cluster config ({e!r})", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {args.config}: provider.worker_ips: the head cannot log in over SSH to "
              f"{', '.join(failed)}; fix the host or drop it from worker_ips", file=sys.stderr)
        return 2
    print(f"[fvae.cluster] the head logs in to all {len(config['provider'].get('worker_ips', []))} "
          "workers over SSH", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "check-workers":
        return _check_workers_main(args)
    workers = args.worker_ips
    if workers is not None:
        workers = [ip.strip() for ip in workers.split(",")] if workers.strip() else []
    try:
        out = render_file(args.template, args.out, argv=argv, head_ip=args.head_ip, worker_ips=workers,
                          ssh_user=args.ssh_user, ssh_key=args.ssh_key, torch=args.torch,
                          cluster_name=args.cluster_name)
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[fvae.cluster] wrote {out}: ray up {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
