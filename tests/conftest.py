"""Shared fixtures: a private lab per test, always torn down, also when the test fails."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from mesh.lab import Lab, load_topology
from mesh.lab.build import _list_netns
from mesh.lab.state import lab_prefix

# Property tests must not fail on a busy machine because one example was slow (no deadline), and a run
# must be repeatable: CI explores the same examples every time (derandomize); failures then reproduce.
settings.register_profile(
    "nodemesh", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nodemesh"))

TWO_NODES: dict[str, Any] = {
    "nodes": [
        {"name": "node-a", "pods": [{"name": "client", "namespace": "default", "serviceAccount": "sleep",
                                     "labels": {"app": "client"}}]},
        {"name": "node-b", "pods": [{"name": "server", "namespace": "default", "serviceAccount": "httpbin",
                                     "labels": {"app": "server"}}]},
    ]
}


def unique_lab_name() -> str:
    return "t" + secrets.token_hex(5)


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test builds network namespaces and must run as root (make test does)")


@pytest.fixture
def make_lab(require_root: None) -> Iterator[Callable[..., Lab]]:
    """Factory: make_lab(topology_dict_or_yaml=TWO_NODES) -> a uniquely named, built Lab.

    Every lab it made is torn down after the test, and the teardown checks nothing of it is left.
    """
    made: list[Lab] = []

    def factory(topology: dict[str, Any] | str | None = None, name: str | None = None) -> Lab:
        lab = Lab.up(load_topology(topology if topology is not None else TWO_NODES), name=name or unique_lab_name())
        made.append(lab)
        return lab

    yield factory
    for lab in made:
        lab.down()
    leftovers = [n for lab in made for n in _list_netns() if n.startswith(lab_prefix(lab.name))]
    assert not leftovers, f"lab teardown left namespaces behind: {leftovers}"


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    """The minimal two-node lab: client on node-a, server on node-b."""
    return make_lab()
