"""The CA's Kubernetes side: agents authenticated by TokenReview, pod placement from the API server.

- `api`: the CA's own small client (TokenReview, list/watch/get pods) and where its configuration comes from;
- `placement`: `KubePodPlacement`, identities on node N = service accounts of the pods scheduled on N;
- `tokenreview`: `TokenReviewAuthenticator`, the node name of a trusted agent's bound token;
- `token`: `TokenCredentials`, the agent's side (a projected token file, re-read for every request).
"""

from mesh.ca.kube.api import KubeApi, KubeApiError, KubeConfigurationError, load_configuration
from mesh.ca.kube.placement import KubePodPlacement, PodFacts
from mesh.ca.kube.token import TokenCredentials
from mesh.ca.kube.tokenreview import (
    DEFAULT_AUDIENCE,
    DEFAULT_TRUSTED_AGENTS,
    TokenReviewAuthenticator,
    parse_trusted_agents,
)

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_TRUSTED_AGENTS",
    "KubeApi",
    "KubeApiError",
    "KubeConfigurationError",
    "KubePodPlacement",
    "PodFacts",
    "TokenCredentials",
    "TokenReviewAuthenticator",
    "load_configuration",
    "parse_trusted_agents",
]
