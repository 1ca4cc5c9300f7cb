"""Run the sampling stage on a local multi-node Ray cluster and remove a node mid-run.

Used by tests/test_sample.py in a subprocess (a ``Cluster`` needs its own
Ray). Prints one JSON line: rows, unique indices and whether a node was removed
while sampling was still going on.
"""

import json
import os
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster

from neon_ray.config import from_dict
from neon_ray.data import synthetic
from neon_ray.sample import SampleConfig, run

checkpoint, out = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
keep = cluster.add_node(num_cpus=2)
doomed = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()

cfg = from_dict(SampleConfig, {"checkpoint": checkpoint, "out": out, "num": 160, "shard_size": 4,
                               "workers": 2, "batch_size": 4, "progress": False, "sampler": {"steps": 16}})
result = {}
thread = threading.Thread(target=lambda: result.update(run(cfg)))
thread.start()
deadline = time.time() + 120
while time.time() < deadline and len([n for n in (os.listdir(out) if os.path.isdir(out) else [])
                                      if n.startswith("shard-")]) < 4:
    time.sleep(0.05)
still_running = thread.is_alive()
cluster.remove_node(doomed)
thread.join(timeout=300)
table = synthetic.read_table(out)
idx = table.column("index").to_pylist()
print(json.dumps({"rows": len(idx), "unique": len(set(idx)), "removed_mid_run": still_running,
                  "manifest_num": result.get("manifest", {}).get("num")}))
ray.shutdown()
cluster.shutdown()
