"""python -m examples.plugin_host [--seconds 60] [--json FILE] [--workdir DIR]"""

import sys

from examples.plugin_host.demo import main

sys.exit(main())
