"""The agent's API server configuration: the shared loader in `mesh.kube.config`."""

from mesh.kube.config import KubeConfigError, in_cluster_configuration, kubeconfig_configuration, load_configuration

__all__ = ["KubeConfigError", "in_cluster_configuration", "kubeconfig_configuration", "load_configuration"]
