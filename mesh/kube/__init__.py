"""Kubernetes-facing pieces of the mesh that are not the agent itself.

`mesh.kube.apiserver` is a test double of the Kubernetes API server for the netns lab and the test suite; it
is never shipped as a control plane. `mesh.kube.kubeconfig` writes the kubeconfig files clients use to reach
it (or any other API server).
"""
