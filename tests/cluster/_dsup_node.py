"""A node taking part in the distributed supervisor ``workers``:
``python _dsup_node.py URL NODE DIR``. Kind ``w``: an OS child that appends
``start NODE ID TOKEN PID`` to DIR/dsup.log and sleeps."""

from __future__ import annotations

import sys

import trellis
import trellis.cluster as tc

url, node, out = sys.argv[1], sys.argv[2], sys.argv[3]


def w(child_id: str) -> trellis.ChildSpec:
    line = f'echo "start {node} {child_id} $TRELLIS_FENCING_TOKEN $$" >> {out}/dsup.log'
    return trellis.Command(["sh", "-c", line + "; exec sleep 1000"], id=child_id, shutdown=2.0)


spec = tc.DistributedSupervisor.child_spec("workers", {"w": w})
cluster = tc.Cluster(tc.ClusterSettings(url, node=node, name="d", lease_ttl=1.0))
sys.exit(trellis.run(lambda: trellis.Supervisor.start_link([spec]), extensions=[cluster]))
