"""What a clip actor ships (``ClipActor`` run in-process) and what the KV cache holds per request."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from workers.bench.records import Sample


class ShipProbe:
    """``ClipActor`` (the class the service's actors run) in this process: the kept tokens exactly as shipped."""

    def __init__(self, settings: Any, model_path: str) -> None:
        from workers.clip_actor import ClipActor

        self.actor = ClipActor(settings, model_path)
        self.qa = self.actor.qa

    def shipped(self, sample: Sample, pruning: Any) -> dict[str, int]:
        from pipeline.schemas import JobRequest

        job = JobRequest.model_validate({"source": sample.path, "kind": "ask", "question": sample.question,
                                         "pruning": pruning})
        try:
            meta, tokens = self.actor.open(job, 0)
        finally:
            self.actor.close()
        return {"bytes": int(meta["bytes_shipped"]), "features_nbytes": int(tokens.features.nbytes),
                "pickled_bytes": len(pickle.dumps(tokens, protocol=5)), "kept": int(tokens.lengths[0]),
                "tokens_in": int(tokens.tokens_in)}

    def text_tokens(self, question: str) -> int:
        """Prompt tokens other than the video span, for this question in the inference template."""
        from pipeline.inference import VIDEO_PROMPT

        ids = self.qa.tokenizer(VIDEO_PROMPT.format(video=self.qa.video_token, question=question.strip()))["input_ids"]
        return len(ids) - 1


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_model(cls, model: Any) -> KVShape:
        text = model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        dtype = next(model.parameters()).dtype
        return cls(text.num_hidden_layers, kv_heads, head_dim, dtype.itemsize)


def kv_tokens_per_layer(shape: KVShape, text_tokens: int, visual_kept: int, fastv_k: int, fastv_ratio: float
                        ) -> list[int]:
    """Tokens each decoder layer caches for one prompt: FastV's layers ≥ K drop round(R · visual) of them."""
    low = text_tokens + visual_kept
    if fastv_ratio <= 0:
        return [low] * shape.layers
    high = text_tokens + visual_kept - int(round(fastv_ratio * visual_kept))
    return [low] * fastv_k + [high] * (shape.layers - fastv_k)


def kv_cache_bytes(shape: KVShape, tokens_per_layer: list[int]) -> int:
    return sum(2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes * n for n in tokens_per_layer)
