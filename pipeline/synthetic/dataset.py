"""Seeded training conversations and the held-out evaluation set.

Sample i of a set with seed s is rendered from ``numpy.random.default_rng([s, i, attempt])``: a pure
function of (s, i), independent of how many samples are drawn or in which order. The held-out set
has its own seed, so none of its clips is a training clip; the validation set (same generator,
``VALIDATION_SEED``) picks the training checkpoint, so the held-out set stays unseen until eval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .language import CAPTION_PROMPT, EVAL_TYPES, NO_EVENT, QA, TRAIN_TYPES, caption, questions_of_type
from .scene import EVENTS, Clip, render_clip

TRAIN_SEED = 20_241_201
HELD_OUT_SEED = 77_000_077
VALIDATION_SEED = 55_000_055  # checkpoint selection while training: never the held-out (test) set
HELD_OUT_SIZE = 750  # 150 questions per EVAL_TYPES entry
NO_EVENT_SHARE = 0.2  # share of time questions whose answer is "none"


@dataclass
class Sample:
    clip: Clip
    qa: QA
    index: int


def training_clip(index: int, seed: int = TRAIN_SEED) -> Clip:
    return render_clip(np.random.default_rng([seed, index]))


def training_conversation(clip: Clip, rng: np.random.Generator, max_turns: int = 6,
                          caption_share: float = 0.25, types: tuple[str, ...] = TRAIN_TYPES) -> list[QA]:
    """Up to ``max_turns`` distinct questions about one clip, spread over ``types``."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if not types or set(types) - set(TRAIN_TYPES):
        raise ValueError(f"types must be a non-empty subset of {TRAIN_TYPES}, got {types!r}")
    # Drawn for every type, asked or not, so that the default draws exactly what it always drew.
    pools = {t: questions_of_type(clip, t, rng) if t in types else [] for t in TRAIN_TYPES}
    turns: list[QA] = []
    # Objects whose colour or shape was already asked. Training isolates turns now (a turn mask), so the
    # pair no longer leaks; the rule stays so the shipped checkpoint's data is reproducible from its seed.
    named: set[int] = set()
    if rng.random() < caption_share:
        turns.append(QA(CAPTION_PROMPT, caption(clip), "caption"))
    while len(turns) < max_turns and any(pools.values()):
        for t in rng.permutation(len(TRAIN_TYPES)):
            pool = pools[TRAIN_TYPES[t]]
            if pool and len(turns) < max_turns:
                qa = pool.pop(int(rng.integers(len(pool))))
                if qa.qtype in ("colour", "shape"):
                    if qa.subject in named:
                        continue
                    named.add(qa.subject)
                turns.append(qa)
    order = rng.permutation(len(turns))
    return [turns[i] for i in order]


def held_out_sample(index: int, seed: int = HELD_OUT_SEED) -> Sample:
    """Question ``index`` of the held-out set: type EVAL_TYPES[index % 5], one question per clip."""
    qtype = EVAL_TYPES[index % len(EVAL_TYPES)]
    for attempt in range(100):
        rng = np.random.default_rng([seed, index, attempt])
        event = None
        if qtype == "time":
            event = "none" if rng.random() < NO_EVENT_SHARE else EVENTS[1 + int(rng.integers(len(EVENTS) - 1))]
        clip = render_clip(rng, event=event)
        pool = questions_of_type(clip, qtype, rng)
        if qtype == "time" and event != "none":
            pool = [qa for qa in pool if qa.answer != NO_EVENT]
        if pool:
            return Sample(clip=clip, qa=pool[int(rng.integers(len(pool)))], index=index)
    raise RuntimeError(f"no {qtype} question for held-out sample {index}")  # pragma: no cover


def held_out_set(num_questions: int = HELD_OUT_SIZE, seed: int = HELD_OUT_SEED) -> list[Sample]:
    if num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    return [held_out_sample(i, seed) for i in range(num_questions)]
