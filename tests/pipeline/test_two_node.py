"""Work spreads over both nodes of a two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``).

Its own module, so it starts after test_engine's module-scoped local Ray has been torn down: started
while that fixture was still alive, the cluster's second node sometimes got no work in a full run."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.engine import score_run
from pipeline.layout import RunLayout
from pipeline.scorer import Resources, Scorer
from pipeline.scorers import build_chain
from tests.builders import write_ingest_run


class NodeScorer(Scorer):
    """Records which Ray node scored each row."""

    name = "node"
    input_columns = (schema.ID,)
    output_fields = (pa.field("node_id", pa.string()),)
    resources = Resources(num_cpus=1, batch_size=5)  # one task per 1-CPU node at a time: the other node must take some

    def score(self, batch):
        import time

        import ray

        time.sleep(0.5)  # long enough that one node cannot finish every task before the other node's workers start
        return {"node_id": [ray.get_runtime_context().get_node_id()] * batch.num_rows}


def test_two_node_cluster_spreads_the_work(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.engine import _loopback_only

    ray.shutdown()
    with _loopback_only():  # both nodes and the driver on 127.0.0.1, not the machine's routable address
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        write_ingest_run(tmp_path, n=60, shard_rows=10, row_group_rows=5)
        stats = score_run(tmp_path, build_chain({"size": {}}) + [NodeScorer()], backend="ray")
        scored = pq.read_table(RunLayout(tmp_path).score_shards())
        assert stats.rows_scored == 60 and scored.num_rows == 60
        nodes = set(scored["node_id"].to_pylist())
        assert nodes == {n["NodeID"] for n in ray.nodes()}, f"work ran on {len(nodes)} of 2 nodes"
    finally:
        ray.shutdown()
        cluster.shutdown()
