"""Print one line ``DUMP <json>`` with argv[1:], the environment, cwd, uid and rlimits."""

import json
import os
import resource
import sys

limits = {
    name: resource.getrlimit(getattr(resource, name))
    for name in ("RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_NOFILE", "RLIMIT_CPU")
}
dump = {
    "argv": sys.argv[1:],
    "env": dict(os.environ),
    "cwd": os.getcwd(),
    "uid": os.getuid(),
    "limits": limits,
}
print("DUMP " + json.dumps(dump), flush=True)
