"""What a ``streamvlm bench service`` run measures (``Plan``: configurations A–D, sizes, the pruning each
configuration asks for) and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONFIGS = ("A", "B", "C", "D")


class BenchUsageError(ValueError):
    """A bad option value; the message names the option."""


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a job failed, a wait timed out)."""


@dataclass(frozen=True)
class Plan:
    clips: int = 750  # the whole held-out set, as `streamvlm eval` scores it
    rounds: int = 4
    concurrency: int = 8
    max_active_jobs: int = 8
    streams: tuple[int, ...] = (1, 2, 4, 8)
    live_windows: int = 4
    window_s: float = 4.0
    stride_s: float = 2.0
    answer_tokens: int = 8  # answers are one word and </s>; eval uses 8 too
    caption_tokens: int = 32
    reduction: float = 0.9
    strategy: str = "redundancy"
    fastv_k: int = 2
    fastv_ratio: float = 0.5
    baseline_threads: int = 1
    probe_clips: int = 3
    first_clip: int = 0
    quick: bool = False

    def pruning(self, config: str) -> dict[str, Any] | str:
        """The job's ``pruning`` field for a service configuration."""
        if config == "B":
            return "off"
        cls = {"encoder_method": "cls", "encoder_reduction": self.reduction, "temporal_strategy": self.strategy}
        if config == "C":
            return {**cls, "fastv_ratio": 0.0}
        if config == "D":
            return {**cls, "fastv_k": self.fastv_k, "fastv_ratio": self.fastv_ratio}
        raise ValueError(f"config {config!r} does not run on the service")

    def label(self, config: str) -> str:
        return {
            "A": "transformers generate, unpruned, one at a time",
            "B": "streamvlm, pruning off",
            "C": f"streamvlm, [CLS] {100 * self.reduction:g}% {self.strategy}",
            "D": f"streamvlm, [CLS] {100 * self.reduction:g}% {self.strategy} + FastV K={self.fastv_k} "
                 f"R={100 * self.fastv_ratio:g}%",
        }[config]


QUICK = Plan(clips=8, rounds=1, concurrency=2, max_active_jobs=2, streams=(1, 2), live_windows=2, window_s=2.0,
             stride_s=2.0, caption_tokens=16, probe_clips=1, quick=True)
