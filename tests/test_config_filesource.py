"""Watched config files: reload on change; a bad file is refused with its field named and the last good
state kept; the store is updated on the event loop's thread."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading

import pytest
import yaml

from mesh.config import ConfigStore, FileSource, lab_state_source, local_config_source, policy_file_source
from mesh.config.model import Scope


async def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll until `predicate()`; the timeout only keeps a broken test from hanging."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def local_config(*ips: str, policy_port: int | None = None) -> str:
    doc: dict = {
        "workloads": [
            {"name": f"w{i}", "namespace": "default", "workloadIps": [ip], "protocol": "HBONE"}
            for i, ip in enumerate(ips)
        ]
    }
    if policy_port:
        doc["policies"] = [
            {
                "name": "deny",
                "namespace": "default",
                "scope": "Namespace",
                "action": "Deny",
                "rules": [[[{"destinationPorts": [policy_port]}]]],
            }
        ]
    return yaml.safe_dump(doc)


def write_atomically(path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_reloads_on_change(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(local_config("10.0.0.1"))
    store = ConfigStore()
    async with local_config_source(path, store, interval=0.02) as src:
        assert store.snapshot.workload_by_ip("10.0.0.1") is not None
        write_atomically(path, local_config("10.0.0.1", "10.0.0.2", policy_port=9999))
        await wait_for(lambda: store.snapshot.workload_by_ip("10.0.0.2") is not None)
        assert "default/deny" in store.snapshot.policies
        path.write_text(local_config("10.0.0.3"))  # in place, not an atomic rename
        await wait_for(lambda: store.snapshot.workload_by_ip("10.0.0.3") is not None)
        assert store.snapshot.workload_by_ip("10.0.0.1") is None
        assert src.loads == 3 and src.last_error is None


async def test_bad_file_keeps_last_good_state_and_names_the_field(tmp_path, caplog):
    path = tmp_path / "mesh.yaml"
    path.write_text(local_config("10.0.0.1"))
    store = ConfigStore()
    caplog.set_level(logging.ERROR, logger="mesh.config.filesource")
    async with local_config_source(path, store, interval=0.02) as src:
        good = store.snapshot
        path.write_text(local_config("10.0.0.1", "10.0.0.2").replace("10.0.0.2", "10.0.0.999"))
        await wait_for(lambda: src.last_error is not None)
        assert "workloads[1].workloadIps[0]: '10.0.0.999' is not an IP address" in src.last_error
        await asyncio.sleep(0.1)  # several more polls of the same bad content
        assert store.snapshot is good
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and "workloads[1].workloadIps[0]" in refusals[0].getMessage()
        assert "keeping the last good state" in refusals[0].getMessage()
        path.write_text(local_config("10.0.0.1", "10.0.0.2"))
        await wait_for(lambda: store.snapshot.workload_by_ip("10.0.0.2") is not None)
        assert src.last_error is None


async def test_missing_then_created_then_deleted(tmp_path):
    path = tmp_path / "later.yaml"
    store = ConfigStore()
    src = local_config_source(path, store, interval=0.02)
    async with src:
        assert "file not found" in src.last_error and store.snapshot.version == 0
        path.write_text(local_config("10.0.0.5"))
        await wait_for(lambda: store.snapshot.workload_by_ip("10.0.0.5") is not None)
        assert src.last_error is None
        path.unlink()
        await wait_for(lambda: src.last_error is not None)
        assert store.snapshot.workload_by_ip("10.0.0.5") is not None


async def test_subscribers_run_on_the_event_loop_thread(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(local_config("10.0.0.1"))
    store = ConfigStore()
    threads = []
    store.subscribe(lambda change: threads.append(threading.get_ident()))
    async with local_config_source(path, store, interval=0.02):
        path.write_text(local_config("10.0.0.2"))
        await wait_for(lambda: len(threads) == 2)
    assert set(threads) == {threading.get_ident()}


async def test_stop_ends_the_watch(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(local_config("10.0.0.1"))
    store = ConfigStore()
    src = local_config_source(path, store, interval=0.02)
    task = src.start()
    await wait_for(lambda: store.snapshot.version == 1)
    await src.stop()
    assert task.done()
    path.write_text(local_config("10.0.0.2"))
    await asyncio.sleep(0.1)
    assert store.snapshot.workload_by_ip("10.0.0.2") is None


def test_poll_without_a_loop_and_a_bad_interval(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(local_config("10.0.0.1"))
    store = ConfigStore()
    src = FileSource(path, store)
    assert src.poll() is True and src.poll() is False
    with pytest.raises(ValueError, match="interval"):
        FileSource(path, store, interval=0)


def test_a_parser_crash_is_contained(tmp_path):
    path = tmp_path / "x"
    path.write_text("anything")

    def broken(data: bytes):
        raise KeyError("bug")

    src = FileSource(path, ConfigStore(), broken)
    assert src.poll() is False
    assert "KeyError" in src.last_error


async def test_policy_and_lab_state_files(tmp_path):
    store = ConfigStore()
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny-all", "namespace": "istio-system"},
                "spec": {"action": "DENY", "rules": [{}]},
            }
        )
    )
    lab = tmp_path / "t1.json"
    lab.write_text(
        json.dumps(
            {
                "name": "t1",
                "trustDomain": "cluster.local",
                "pods": [
                    {
                        "name": "p",
                        "namespace": "default",
                        "ip": "10.244.1.2",
                        "node": "n",
                        "netns": "nm-t1-p",
                        "labels": {"istio.io/dataplane-mode": "ambient"},
                    }
                ],
            }
        )
    )
    async with policy_file_source(policies, store, interval=0.02), lab_state_source(lab, store, interval=0.02):
        snap = store.snapshot
        assert snap.policies["istio-system/deny-all"].scope is Scope.GLOBAL
        assert snap.workload_by_ip("10.244.1.2").netns == "/run/netns/nm-t1-p"
        assert set(store.sources()) == {f"policies:{policies}", "lab:t1"}
