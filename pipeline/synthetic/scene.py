"""Seeded synthetic clips: small coloured shapes moving over a textured, cluttered background.

Shapes (one clip):
  frames      (T, H, W, 3) uint8, T = 8, H = W = 64
  positions   (T, 2) float, object centre (x, y) in pixels, per object
  visible     (T,) bool, per object
  patch mask  (T, P) bool, P = (H / patch)², which patches an object's pixels touch

An object is ~10 px across (a few 8-px patches) and covers well under a tenth of the frame, so which
visual tokens survive pruning decides whether a question can still be answered. Every clip is a pure
function of (seed, index): the same pair always gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FRAME_SIZE = 64
NUM_FRAMES = 8
# A clip as a video file or camera (demo, tests, benchmarks, eval --video h264): each frame on screen
# VIDEO_REPEAT / VIDEO_FPS s, so one clip is 4 s of video.
VIDEO_FPS, VIDEO_REPEAT = 8, 4
PATCH_SIZE = 8
OBJECT_RADIUS = 5.0

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (40, 200, 50),
    "blue": (40, 70, 240),
    "yellow": (240, 225, 40),
    "cyan": (40, 215, 225),
    "magenta": (225, 45, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = ("none", "appear", "disappear", "change")
MAX_OBJECTS = 4


@dataclass
class SceneObject:
    """One shape's whole track through the clip."""

    shape: str
    colours: list[str]  # per frame: a "change" event switches it once
    direction: str
    positions: np.ndarray  # (T, 2) float x, y
    visible: np.ndarray  # (T,) bool

    @property
    def colour(self) -> str:
        return self.colours[0]

    @property
    def always_visible(self) -> bool:
        return bool(self.visible.all())

    @property
    def changes_colour(self) -> bool:
        return self.colours[0] != self.colours[-1]


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    objects: list[SceneObject]
    event: str  # one of EVENTS
    event_object: int | None  # index into objects of the object the event happens to
    event_frame: int | None  # first frame in which the event has happened
    masks: np.ndarray = field(repr=False)  # (T, H, W) bool, any object pixel

    def patch_mask(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(T, P) bool in raster order: True where a patch holds at least one object pixel."""
        t, h, w = self.masks.shape
        grid = self.masks.reshape(t, h // patch_size, patch_size, w // patch_size, patch_size)
        return grid.any(axis=(2, 4)).reshape(t, -1)

    def object_pixel_counts(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(T, P, K) int64: pixels of object k drawn in each patch (raster order); objects drawn later
        cover earlier ones, as in the frames, so an object hidden in a frame has no pixels there."""
        t, h, w = self.masks.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        owner = np.full((t, h, w), -1, dtype=np.int64)  # (T, H, W) index of the object drawn at a pixel
        for k, obj in enumerate(self.objects):
            for f in np.flatnonzero(obj.visible):
                cx, cy = obj.positions[f]
                owner[f][_shape_mask(obj.shape, xx - cx, yy - cy, OBJECT_RADIUS)] = k
        gh, gw = h // patch_size, w // patch_size
        cells = owner.reshape(t, gh, patch_size, gw, patch_size).transpose(0, 1, 3, 2, 4).reshape(t, gh * gw, -1)
        return np.stack([(cells == k).sum(-1) for k in range(len(self.objects))], axis=-1)  # (T, P, K)

    def patch_labels(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(T, P, 2) int64 per patch: 1 + shape index and 1 + colour index of the object with the most
        pixels in it, 0 where no object pixel is; objects drawn later cover earlier ones, as in the frames."""
        counts = self.object_pixel_counts(patch_size)  # (T, P, K)
        t, p = counts.shape[:2]
        best = counts.argmax(-1)  # (T, P)
        hit = counts.max(-1) > 0  # (T, P) some object pixel in the patch
        shape_ids = np.array([1 + SHAPES.index(o.shape) for o in self.objects])  # (K,)
        colour_ids = np.array([[1 + list(COLOURS).index(c) for c in o.colours] for o in self.objects])  # (K, T)
        labels = np.zeros((t, p, 2), dtype=np.int64)
        labels[..., 0] = np.where(hit, shape_ids[best], 0)
        labels[..., 1] = np.where(hit, colour_ids[best, np.arange(t)[:, None]], 0)
        return labels

    def frame_labels(self) -> np.ndarray:
        """(T, C·S + C + S) float multi-hot per frame: colour-shape pairs shown, then colours, then shapes."""
        nc, ns = len(COLOURS), len(SHAPES)
        labels = np.zeros((len(self.frames), nc * ns + nc + ns), dtype=np.float32)
        colour_ids = {c: i for i, c in enumerate(COLOURS)}
        for obj in self.objects:
            s = SHAPES.index(obj.shape)
            for t in np.flatnonzero(obj.visible):
                c = colour_ids[obj.colours[t]]
                labels[t, [c * ns + s, nc * ns + c, nc * ns + nc + s]] = 1.0
        return labels

    def frame_place_labels(self, patch_size: int = PATCH_SIZE) -> np.ndarray:
        """(T, (C + S) · 2 · G) float multi-hot per frame, G = W / patch_size: for every colour, then every
        shape, shown in the frame, the patch column and the patch row under its centre (block of colour or
        shape a: columns at a·2G + column, rows at a·2G + G + row). Where each object is, which the frame
        labels above do not say."""
        nc, ns = len(COLOURS), len(SHAPES)
        grid = self.frames.shape[2] // patch_size
        labels = np.zeros((len(self.frames), (nc + ns) * 2 * grid), dtype=np.float32)
        colour_ids = {c: i for i, c in enumerate(COLOURS)}
        for obj in self.objects:
            s = SHAPES.index(obj.shape)
            for t in np.flatnonzero(obj.visible):
                col, row = (np.clip(obj.positions[t], 0, self.frames.shape[2] - 1) // patch_size).astype(int)
                for a in (colour_ids[obj.colours[t]], nc + s):
                    labels[t, [a * 2 * grid + col, a * 2 * grid + grid + row]] = 1.0
        return labels


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
    if shape == "cross":
        thin = r * 0.38
        return ((np.abs(dx) <= thin) & (np.abs(dy) <= r)) | ((np.abs(dy) <= thin) & (np.abs(dx) <= r))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W, 3) float: muted base tone, blotchy low-frequency texture, fine grain and grey clutter."""
    base = rng.uniform(80, 150) + rng.uniform(-15, 15, size=3)
    coarse = rng.normal(0.0, 1.0, size=(5, 5, 3)).astype(np.float32)
    idx = np.linspace(0, 4, size)
    i0 = np.clip(np.floor(idx).astype(int), 0, 3)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # (H, 5, 3)
    f2 = (idx - i0)[None, :, None]
    blotch = rows[:, i0] * (1 - f2) + rows[:, i0 + 1] * f2  # (H, W, 3)
    luma = blotch.mean(axis=2, keepdims=True)
    bg = base + 14.0 * luma + 5.0 * (blotch - luma) + rng.normal(0.0, 5.0, size=(size, size, 1))
    for _ in range(int(rng.integers(5, 10))):  # clutter: short grey strokes and specks
        grey = rng.uniform(40, 200)
        x0, y0 = rng.integers(0, size, size=2)
        if rng.random() < 0.5:
            w, h = int(rng.integers(1, 3)), int(rng.integers(3, 10))
        else:
            w, h = int(rng.integers(3, 10)), int(rng.integers(1, 3))
        bg[y0 : y0 + h, x0 : x0 + w] = grey + rng.uniform(-8, 8, size=3)
    return bg


def _track(rng: np.random.Generator, direction: str, num_frames: int, size: int) -> np.ndarray:
    """(T, 2) centres of a straight move that stays fully inside the frame."""
    speed = rng.uniform(2.5, 3.5)
    travel = speed * (num_frames - 1)
    lo, hi = OBJECT_RADIUS + 1.0, size - OBJECT_RADIUS - 1.0
    ux, uy = DIRECTIONS[direction]
    start = np.empty(2)
    for axis, u in ((0, ux), (1, uy)):
        if u > 0:
            start[axis] = rng.uniform(lo, hi - travel)
        elif u < 0:
            start[axis] = rng.uniform(lo + travel, hi)
        else:
            start[axis] = rng.uniform(lo, hi)
    steps = np.arange(num_frames)[:, None] * speed
    return start[None, :] + steps * np.array([ux, uy], dtype=float)[None, :]


def _apart(a: SceneObject, b: SceneObject) -> bool:
    both = a.visible & b.visible
    if not both.any():
        return True
    dist = np.linalg.norm(a.positions[both] - b.positions[both], axis=1)
    return bool(dist.min() >= 2 * OBJECT_RADIUS + 3.0)


def render_clip(
    rng: np.random.Generator,
    *,
    event: str | None = None,
    num_objects: int | None = None,
    num_frames: int = NUM_FRAMES,
    size: int = FRAME_SIZE,
) -> Clip:
    """One clip. ``event`` and ``num_objects`` (total distinct objects, 1..4) are drawn when None."""
    if event is None:
        event = EVENTS[int(rng.integers(len(EVENTS)))]
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    min_objects = 2 if event in ("appear", "disappear") else 1
    if num_objects is None:
        num_objects = int(rng.integers(min_objects, MAX_OBJECTS + 1))
    if not min_objects <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [{min_objects}, {MAX_OBJECTS}] for event {event!r}")

    colour_names = list(COLOURS)
    for _attempt in range(200):
        colours = [colour_names[i] for i in rng.permutation(len(colour_names))]
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        objects: list[SceneObject] = []
        for k in range(num_objects):
            direction = list(DIRECTIONS)[int(rng.integers(4))]
            objects.append(
                SceneObject(
                    shape=shapes[k],
                    colours=[colours[k]] * num_frames,
                    direction=direction,
                    positions=_track(rng, direction, num_frames, size),
                    visible=np.ones(num_frames, dtype=bool),
                )
            )
        event_object: int | None = None
        event_frame: int | None = None
        if event != "none":
            event_object = num_objects - 1
            obj = objects[event_object]
            # Late appearances and early exits dominate, so many answers live in one or two frames.
            if event == "appear":
                event_frame = int(rng.choice(np.arange(1, num_frames), p=_late_weights(num_frames - 1)))
                obj.visible[:event_frame] = False
            elif event == "disappear":
                last = int(rng.choice(np.arange(0, num_frames - 1), p=_late_weights(num_frames - 1)[::-1]))
                event_frame = last + 1
                obj.visible[event_frame:] = False
            else:
                event_frame = int(rng.integers(1, num_frames))
                new_colour = colours[num_objects]  # unused by the other objects
                obj.colours = [obj.colours[0]] * event_frame + [new_colour] * (num_frames - event_frame)
        if all(_apart(a, b) for i, a in enumerate(objects) for b in objects[i + 1 :]):
            break
    else:  # pragma: no cover - 200 failed placements of ≤ 4 small objects do not happen in practice
        raise RuntimeError("could not place objects apart")

    background = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    masks = np.zeros((num_frames, size, size), dtype=bool)
    for t in range(num_frames):
        img = background + rng.normal(0.0, 3.0, size=background.shape)  # sensor noise per frame
        for obj in objects:
            if not obj.visible[t]:
                continue
            cx, cy = obj.positions[t]
            m = _shape_mask(obj.shape, xx - cx, yy - cy, OBJECT_RADIUS)
            shade = 1.0 - 0.12 * ((yy - cy) / OBJECT_RADIUS)[..., None]  # a little shading
            img = np.where(m[..., None], np.asarray(COLOURS[obj.colours[t]], dtype=np.float32) * shade, img)
            masks[t] |= m
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return Clip(
        frames=frames,
        objects=objects,
        event=event,
        event_object=event_object,
        event_frame=event_frame,
        masks=masks,
    )


def _late_weights(n: int) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=float) ** 1.5
    return w / w.sum()
