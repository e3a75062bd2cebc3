"""Where a component finds its API server: in-cluster service account, or a kubeconfig file.

One loader for the agent, the CA and the waypoint (all of them may import `mesh`).

The order is the one client-go tools use: an explicit kubeconfig wins; otherwise, inside a pod (the
DaemonSet), the service account token and CA mounted by the kubelet and the `KUBERNETES_SERVICE_*`
variables; otherwise `$KUBECONFIG`, then `~/.kube/config`. Loading is done by kubernetes-asyncio's loaders
(token refresh included); failures become `KubeConfigError` saying which source failed and why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import ConfigException, load_kube_config
from kubernetes_asyncio.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)


class KubeConfigError(ValueError):
    """No usable API server configuration; the message names the source tried and the cause."""


def in_cluster_configuration(environ: Mapping[str, str] | None = None, token_file: str = SERVICE_TOKEN_FILENAME,
                             ca_file: str = SERVICE_CERT_FILENAME) -> Configuration:
    cfg = Configuration()
    try:
        InClusterConfigLoader(token_filename=token_file, cert_filename=ca_file,
                              environ=dict(os.environ if environ is None else environ)).load_and_set(cfg)
    except (ConfigException, OSError) as err:
        raise KubeConfigError(f"in-cluster config (token {token_file}, CA {ca_file}): {err}") from None
    return cfg


async def kubeconfig_configuration(path: str | os.PathLike[str], context: str | None = None) -> Configuration:
    cfg = Configuration()
    if not Path(path).is_file():
        raise KubeConfigError(f"kubeconfig {path}: no such file")
    try:
        await load_kube_config(config_file=str(path), context=context, client_configuration=cfg)
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as err:
        raise KubeConfigError(f"kubeconfig {path}: {err}") from None
    return cfg


async def load_configuration(kubeconfig: str | os.PathLike[str] | None = None, context: str | None = None,
                             environ: Mapping[str, str] | None = None) -> Configuration:
    env = os.environ if environ is None else environ
    if kubeconfig:
        return await kubeconfig_configuration(kubeconfig, context)
    if env.get(SERVICE_HOST_ENV_NAME):
        return in_cluster_configuration(env)
    for candidate in [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p] + \
            [str(Path(env.get("HOME", "~")).expanduser() / ".kube" / "config")]:
        if Path(candidate).is_file():
            return await kubeconfig_configuration(candidate, context)
    raise KubeConfigError("no Kubernetes configuration: not in a cluster (KUBERNETES_SERVICE_HOST unset), "
                          "no --kubeconfig, no $KUBECONFIG file and no ~/.kube/config")
