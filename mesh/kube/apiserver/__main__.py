"""`python -m mesh.kube.apiserver --listen 127.0.0.1:PORT [--state LABSTATE.json] [--kubeconfig FILE]`."""

import sys

from mesh.kube.apiserver.runner import main

sys.exit(main())
