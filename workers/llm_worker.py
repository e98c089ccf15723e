"""The LLM worker actor: the model loaded once, requests from any job batched dynamically, FastV generation.

Requests arrive as (kept pre-projector visual tokens, question, pruning config, generation settings).
A batch closes when it holds ``max_batch_size`` requests or ``max_batch_wait_ms`` has passed since its
first; requests that need different LLM-side pruning (PruningConfig.llm_key) or generation settings go in
separate batches.
Generation runs in a thread so the actor keeps accepting requests while the model works.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import ray
import torch

from pipeline.inference import Answer, VideoQA
from pruning.config import PruningConfig
from pruning.visual_tokens import VisualTokens


@dataclass
class _Request:
    visual: VisualTokens
    question: str
    config: PruningConfig
    max_new_tokens: int
    temperature: float
    seed: int | None
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def group(self) -> tuple:
        # Rows of one batch share the LLM-side pruning settings (FastV, position ids) and the generation settings.
        return (self.config.llm_key, self.max_new_tokens, self.temperature,
                self.visual.num_frames, self.visual.tokens_per_frame, self.visual.modality)


class LLMWorker:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
                 max_batch_size: int = 8, max_batch_wait_ms: float = 20.0, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.qa = VideoQA.load(model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Request] | None = None
        self._batcher: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()

    async def generate(self, visual: VisualTokens, question: str, config: PruningConfig,
                       max_new_tokens: int, temperature: float, seed: int | None = None) -> Answer:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(visual, question, config, max_new_tokens, temperature, seed, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_batch_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            groups: dict[tuple, list[_Request]] = {}
            for req in batch:
                groups.setdefault(req.group, []).append(req)
            for reqs in groups.values():
                await self._run(reqs)

    async def _run(self, reqs: list[_Request]) -> None:
        first = reqs[0]
        started = time.perf_counter()
        try:
            answers = await asyncio.to_thread(
                self.qa.answer, [r.visual for r in reqs], [r.question for r in reqs], first.config,
                first.max_new_tokens, first.temperature, first.seed,
            )
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the worker down
            for r in reqs:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self.batch_sizes[len(reqs)] += 1
        for r, a in zip(reqs, answers, strict=True):
            a.timings_s["llm_queue_s"] = started - r.arrived
            if not r.future.done():
                r.future.set_result(a)

    def stats(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.batch_sizes.items())}

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def llm_worker_actor(num_gpus: float, num_cpus: float, resources: dict[str, float], max_restarts: int):
    """The actor class with its resources; generation is idempotent, so Ray may retry it after a crash.

    Retries stay finite even when restarts are not: a request that kills the worker every time fails
    after a few tries, and its job is then bounded by ``queue.max_deliveries``."""
    task_retries = 3 if max_restarts < 0 else max_restarts
    return ray.remote(
        num_gpus=num_gpus, num_cpus=num_cpus, resources=resources or None,
        max_restarts=max_restarts, max_task_retries=task_retries, max_concurrency=64,
    )(LLMWorker)
