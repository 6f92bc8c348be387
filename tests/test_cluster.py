"""Cluster launcher configs: valid for Ray's own validator (offline) and safe by construction."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
util = pytest.importorskip("ray.autoscaler._private.util")

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"
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
    assert prepared["file_mounts"], "the working tree should be synced to the nodes"
    assert any("pip install" in c and "-e ~/fvae" in c for c in prepared["setup_commands"])


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
