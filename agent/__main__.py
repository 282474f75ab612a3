"""``python -m ktrace_agent``: the agent image's entrypoint."""

import sys

from .main import main

sys.exit(main())
