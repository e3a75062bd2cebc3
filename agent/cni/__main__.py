"""`python -m agent.cni`: the plugin, for runtimes (and tests) that can run it from the installed package."""

import sys

from agent.cni.plugin import main

sys.exit(main())
