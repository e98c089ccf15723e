"""Cluster mode: a two-node Ray cluster on this machine; LLM workers go where the GPU-like resource is."""

from __future__ import annotations

import json
import time

import ray
from ray.cluster_utils import Cluster
from service_helpers import RunningService, clip_video, service_settings

from pipeline.keys import RedisKeys


def test_llm_workers_land_on_the_gpu_like_node_and_the_pipeline_answers(tmp_path):
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_node = cluster.add_node(num_cpus=1, resources={"gpu_like": 1})
    try:
        settings = service_settings(tmp_path, **{
            "ray.address": cluster.address,
            "workers.llm_resources": '{"gpu_like": 1}',
            "workers.max_active_jobs": "2",
        })
        svc = RunningService(settings)
        try:
            [llm] = svc.service.llm_workers
            assert ray.get(llm.node_id.remote()) == gpu_node.node_id
            clip_nodes = {ray.get(a.node_id.remote()) for a in svc.service.clip_actors}
            assert gpu_node.node_id not in clip_nodes  # nothing else asked for the GPU-like resource

            path, sample = clip_video(tmp_path / "clip.mp4", 0)
            keys = RedisKeys()
            svc.redis.xadd(keys.jobs, {"job": json.dumps({"job_id": "cl-1", "source": str(path), "kind": "ask",
                                                         "question": sample.qa.question})})
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and svc.redis.hget(keys.job("cl-1"), "state") != b"done":
                assert svc.redis.hget(keys.job("cl-1"), "state") != b"failed", svc.redis.hgetall(keys.job("cl-1"))
                time.sleep(0.3)
            [(_, fields)] = svc.redis.xrange(keys.job_results("cl-1"))
            assert json.loads(fields[b"result"])["text"]
        finally:
            svc.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
