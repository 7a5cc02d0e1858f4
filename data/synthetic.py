"""A synthetic video task whose classes are motions, encoded as real H.264 mp4 with PyAV.

Each clip shows a shape of random kind, colour, size and place moving in one of eight ways, plus a static
distractor over a textured background. Positions and sizes are drawn so that the middle frame has the same
distribution for every class: no single frame reveals the class, only the order of frames does.

The image variant (``synthetic_images``) is one frame of such a clip, labelled by the moving shape's kind.

The retrieval variant (``retrieval_samples``) draws the moving shape's colour from named colours and its
speed from two, and describes each clip in several captions built from its colour, shape, motion and speed.
"""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

MOTIONS = ("left", "right", "up", "down", "clockwise", "anticlockwise", "approaching", "receding")
SHAPES = ("circle", "square", "triangle", "diamond")


def encode_mp4(frames: np.ndarray, fps: int = 16, crf: int = 23) -> bytes:
    """(F, H, W, 3) uint8 RGB -> H.264 mp4 bytes (H and W must be even)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)  # triangle, apex up


def _trajectory(motion: str, rng: np.random.Generator, size: int, frames: int, speed: float = 1.0):
    """Centres (F, 2) and radii (F,) of the moving shape; ``speed`` scales how far it goes in the clip."""
    t = np.linspace(0.0, 1.0, frames) * speed
    if motion in ("approaching", "receding"):
        small, large = rng.uniform(0.05, 0.09) * size, rng.uniform(0.16, 0.24) * size
        radius = small + (large - small) * (t if motion == "approaching" else 1 - t)
        centre = rng.uniform(large, size - large, size=2)
        return np.tile(centre, (frames, 1)), radius
    radius = np.full(frames, rng.uniform(0.08, 0.13) * size)
    r = radius[0]
    if motion in ("clockwise", "anticlockwise"):
        orbit = rng.uniform(0.16, 0.24) * size
        centre = rng.uniform(r + orbit, size - r - orbit, size=2)
        sweep = rng.uniform(1.2, 1.8) * np.pi * (1 if motion == "clockwise" else -1)
        angle = rng.uniform(0, 2 * np.pi) + sweep * t  # image y points down: +angle turns clockwise on screen
        return np.stack([centre[0] + orbit * np.sin(angle), centre[1] + orbit * np.cos(angle)], 1), radius
    travel = rng.uniform(0.45, 0.62) * size
    axis = 1 if motion in ("left", "right") else 0
    sign = 1 if motion in ("right", "down") else -1
    start = np.empty(2)
    start[axis] = rng.uniform(r, size - r - travel) + (travel if sign < 0 else 0)
    start[1 - axis] = rng.uniform(r, size - r)
    centre = np.tile(start, (frames, 1))
    centre[:, axis] += sign * travel * t
    return centre, radius


def render_clip(
    motion: str,
    rng: np.random.Generator,
    size: int = 112,
    frames: int = 32,
    colour: np.ndarray | None = None,
    shape: str | None = None,
    speed: float = 1.0,
) -> np.ndarray:
    """One clip of ``motion`` as (frames, size, size, 3) uint8; colour and shape random unless given."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Random hues, but the shapes are always brighter than the background: one contrast polarity keeps the
    # task learnable in minutes on a CPU without making any single frame informative.
    background = rng.uniform(0, 90, size=3)
    texture = rng.normal(0, 6, size=(size, size, 1))
    base = np.clip(background + texture, 0, 255)
    random_colour, distractor_colour = rng.uniform(150, 255, size=(2, 3))
    random_shape, distractor_shape = rng.choice(SHAPES, size=2)
    colour = random_colour if colour is None else colour
    shape = random_shape if shape is None else shape
    d_radius = rng.uniform(0.06, 0.1) * size
    d_centre = rng.uniform(d_radius, size - d_radius, size=2)
    base[_mask(distractor_shape, yy, xx, *d_centre, d_radius)] = distractor_colour
    centres, radii = _trajectory(motion, rng, size, frames, speed)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        frame = base.copy()
        frame[_mask(shape, yy, xx, *centres[i], radii[i])] = colour
        clip[i] = frame
    return clip


def synthetic_samples(
    count: int, seed: int, size: int = 112, frames: int = 32, prefix: str = "clip", start: int = 0
):
    """``count`` (key, "mp4", bytes, label, metadata) samples numbered from ``start``, classes balanced."""
    rng = np.random.default_rng(seed)
    for index in range(start, start + count):
        label = index % len(MOTIONS)
        clip = render_clip(MOTIONS[label], rng, size, frames)
        meta = {"motion": MOTIONS[label], "frames": frames, "height": size, "width": size}
        yield f"{prefix}{index:06d}", "mp4", encode_mp4(clip), label, meta


def textured_clip(rng: np.random.Generator, height: int, width: int, frames: int) -> np.ndarray:
    """(frames, height, width, 3) uint8: a camera drifting over and zooming in and out of a random scene with
    detail at every scale (blobs, edges, fine grain), so that every frame has sub-pixel motion and a changing
    scale, unlike the flat shapes of ``render_clip``. For benchmarks of
    decoding and packing (H.264 at crf 23: about 150 kbit/s at 320x240)."""
    from PIL import Image

    scene = np.zeros((2 * height, 2 * width, 3), np.float32)
    for cell, weight in ((32, 0.4), (8, 0.3), (2, 0.2), (1, 0.1)):
        coarse = rng.integers(0, 256, (2 * height // cell + 2, 2 * width // cell + 2, 3), dtype=np.uint8)
        layer = Image.fromarray(coarse).resize((2 * width + 2 * cell, 2 * height + 2 * cell), Image.BICUBIC)
        scene += weight * np.asarray(layer, np.float32)[cell : cell + 2 * height, cell : cell + 2 * width]
    image = Image.fromarray(scene.clip(0, 255).astype(np.uint8))
    clip = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        zoom = 1.0 + 0.3 * np.sin(2 * np.pi * i / max(frames, 1))  # the window's size against the output
        cy = height + 0.15 * height * np.sin(i / 25)
        cx = width + 0.25 * width * (2 * i / max(frames - 1, 1) - 1)
        h, w = height * zoom / 2, width * zoom / 2
        box = (cx - w, cy - h, cx + w, cy + h)
        clip[i] = np.asarray(image.resize((width, height), Image.BILINEAR, box=box))
    return clip


def synthetic_images(count: int, seed: int, size: int = 112, prefix: str = "image", start: int = 0):
    """``count`` (key, "png", bytes, label, metadata) images numbered from ``start``, classes balanced: one
    frame, at a random time, of a clip with a random motion whose moving shape is ``SHAPES[label]`` (the
    clip's static distractor, usually smaller, has a random shape)."""
    rng = np.random.default_rng(seed)
    for index in range(start, start + count):
        label = index % len(SHAPES)
        motion = str(rng.choice(MOTIONS))
        clip = render_clip(motion, rng, size, frames=8, shape=SHAPES[label])
        buffer = io.BytesIO()
        Image.fromarray(clip[rng.integers(len(clip))]).save(buffer, format="PNG")
        meta = {"shape": SHAPES[label], "motion": motion, "height": size, "width": size}
        yield f"{prefix}{index:06d}", "png", buffer.getvalue(), label, meta


# -- retrieval ----------------------------------------------------------------------------------------------

COLOURS = {  # all brighter than the background, as the recognition clips' shapes are
    "red": (235, 45, 45),
    "green": (50, 225, 60),
    "blue": (70, 110, 255),
    "yellow": (240, 225, 40),
    "white": (240, 240, 240),
    "purple": (190, 70, 235),
}
SPEEDS = {"slowly": 0.45, "quickly": 1.0}  # fraction of the full path covered in the clip
MOTION_PHRASES = {
    "left": ("moves to the left", "moving left", "slides leftwards"),
    "right": ("moves to the right", "moving right", "slides rightwards"),
    "up": ("moves up", "moving upwards", "rises"),
    "down": ("moves down", "moving downwards", "falls"),
    "clockwise": ("turns clockwise", "circling clockwise", "goes round clockwise"),
    "anticlockwise": ("turns anticlockwise", "circling anticlockwise", "goes round anticlockwise"),
    "approaching": ("comes closer", "growing bigger", "approaches the camera"),
    "receding": ("moves away", "shrinking", "recedes from the camera"),
}


def describe(colour: str, shape: str, motion: str, speed: str) -> list[str]:
    """Three captions of one clip, in different words."""
    verb, gerund, other = MOTION_PHRASES[motion]
    adjective = "slow" if speed == "slowly" else "fast"
    return [
        f"a {colour} {shape} {verb} {speed}",
        f"a {adjective} {colour} {shape} {gerund}",
        f"the {shape} is {colour} and {other} {speed}",
    ]


def retrieval_samples(
    count: int, seed: int, size: int = 112, frames: int = 32, prefix: str = "clip", start: int = 0
):
    """``count`` (key, "mp4", bytes, label, metadata) samples whose metadata carries ``captions``; the label
    is the motion index (so the same shards also serve recognition)."""
    rng = np.random.default_rng(seed)
    for index in range(start, start + count):
        label = index % len(MOTIONS)
        motion = MOTIONS[label]
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        speed = str(rng.choice(list(SPEEDS)))
        clip = render_clip(motion, rng, size, frames, np.array(COLOURS[colour], float), shape, SPEEDS[speed])
        meta = {
            "motion": motion,
            "colour": colour,
            "shape": shape,
            "speed": speed,
            "captions": describe(colour, shape, motion, speed),
            "frames": frames,
            "height": size,
            "width": size,
        }
        yield f"{prefix}{index:06d}", "mp4", encode_mp4(clip), label, meta


def caption_corpus() -> list[str]:
    """Every caption the retrieval set can produce (what the local tokenizer's merges are learned from)."""
    return [
        caption
        for colour in COLOURS
        for shape in SHAPES
        for motion in MOTIONS
        for speed in SPEEDS
        for caption in describe(colour, shape, motion, speed)
    ]
