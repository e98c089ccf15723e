"""Question/answer templates and one-sentence captions for synthetic clips.

Answers are single words. Question types (EVAL_TYPES are the ones the held-out set measures):
  colour     what colour is the <shape> ?                  -> colour
  shape      what shape is the <colour> object ?           -> shape
  direction  which way does the <shape> move ?             -> left | right | up | down
  count      how many shapes are there ?                   -> one .. four (all objects ever seen)
  time       which shape appears / disappears ? what colour does the <shape> turn ? ...
             -> the answer lives in the frames around the event; "none" when nothing happens
  position   (training only) is the <shape> left or right at the start ?  -> a stepping stone that
             teaches reading an object's place from its patch, which direction compares across frames
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import COLOURS, DIRECTIONS, FRAME_SIZE, SHAPES, Clip, SceneObject

EVAL_TYPES = ("colour", "shape", "direction", "count", "time")
TRAIN_TYPES = (*EVAL_TYPES, "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
CAPTION_PROMPT = "describe the video ."
NO_EVENT = "none"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str
    subject: int | None = None  # index of the object asked about, when there is one


def _name(obj: SceneObject, rng: np.random.Generator) -> str:
    # Shapes are unique within a clip; colours too, except that a changing object has two.
    if obj.changes_colour or rng.random() < 0.5:
        return f"the {obj.shape}"
    return f"the {obj.colour} object"


def questions_of_type(clip: Clip, qtype: str, rng: np.random.Generator) -> list[QA]:
    """Every question of ``qtype`` this clip can answer unambiguously (maybe none)."""
    steady = [(i, o) for i, o in enumerate(clip.objects) if o.always_visible and not o.changes_colour]
    whole = [(i, o) for i, o in enumerate(clip.objects) if o.always_visible]
    out: list[QA] = []
    if qtype == "colour":
        out = [QA(f"what colour is the {o.shape} ?", o.colour, qtype, i) for i, o in steady]
    elif qtype == "shape":
        out = [QA(f"what shape is the {o.colour} object ?", o.shape, qtype, i) for i, o in steady]
    elif qtype == "direction":
        out = [QA(f"which way does {_name(o, rng)} move ?", o.direction, qtype, i) for i, o in whole]
    elif qtype == "count":
        out = [QA("how many shapes are there ?", NUMBER_WORDS[len(clip.objects)], qtype)]
    elif qtype == "time":
        out = _time_questions(clip)
    elif qtype == "position":
        for i, o in whole:
            when, t = ("start", 0) if rng.random() < 0.5 else ("end", len(clip.frames) - 1)
            x, y = o.positions[t]
            if rng.random() < 0.5:
                out.append(QA(f"is {_name(o, rng)} left or right at the {when} ?",
                              "left" if x < FRAME_SIZE / 2 else "right", qtype, i))
            else:
                out.append(QA(f"is {_name(o, rng)} up or down at the {when} ?",
                              "up" if y < FRAME_SIZE / 2 else "down", qtype, i))
    else:
        raise ValueError(f"qtype must be one of {TRAIN_TYPES}, got {qtype!r}")
    return out


def _time_questions(clip: Clip) -> list[QA]:
    ev = clip.objects[clip.event_object] if clip.event_object is not None else None
    out: list[QA] = []
    for kind, verb in (("appear", "appears"), ("disappear", "disappears")):
        if clip.event == kind and ev is not None:
            out.append(QA(f"which shape {verb} ?", ev.shape, "time"))
            out.append(QA(f"what colour is the shape that {verb} ?", ev.colour, "time"))
        elif clip.event == "none":
            out.append(QA(f"which shape {verb} ?", NO_EVENT, "time"))
    if clip.event == "change" and ev is not None:
        out.append(QA(f"what colour does the {ev.shape} turn ?", ev.colours[-1], "time"))
        out.append(QA("which shape changes colour ?", ev.shape, "time"))
    elif clip.event == "none":
        out.append(QA("which shape changes colour ?", NO_EVENT, "time"))
    return out


def caption(clip: Clip) -> str:
    """One sentence naming every object, how it moves and what happens to it."""
    parts = []
    for i, o in enumerate(clip.objects):
        phrase = f"a {o.colour} {o.shape} moves {o.direction}"
        if i == clip.event_object:
            if clip.event == "appear":
                phrase = f"a {o.colour} {o.shape} appears"
            elif clip.event == "disappear":
                phrase = f"a {o.colour} {o.shape} disappears"
            elif clip.event == "change":
                phrase = f"a {o.colour} {o.shape} moves {o.direction} and turns {o.colours[-1]}"
        parts.append(phrase)
    if len(parts) == 1:
        return parts[0] + " ."
    return " , ".join(parts[:-1]) + " and " + parts[-1] + " ."


def vocabulary() -> list[str]:
    """Every word any question, answer or caption can use (sorted, no special tokens)."""
    words = set(CAPTION_PROMPT.split())
    templates = [
        "what colour is the shape that appears disappears turn changes ?",
        "what shape is the object ?",
        "which way does the move ?",
        "how many shapes are there ?",
        "is left or right at the start end ? up down",
        "a moves and appears disappears turns , .",
    ]
    for t in templates:
        words.update(t.split())
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(DIRECTIONS)
    words.update(NUMBER_WORDS)
    words.add(NO_EVENT)
    return sorted(words)
