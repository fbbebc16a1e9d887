"""Procedural image-caption world: coloured shapes on textured backgrounds.

Every image shows one object with compositional attributes (shape, colour, size, position,
rotation) on a background texture, rendered in a *style* (photo, sketch, noise, recolor).
Rendering is vectorised with numpy: masks come from coordinate grids evaluated for a whole
bank of images at once, with 2x supersampling for anti-aliased edges.

Typical use::

    rng = np.random.default_rng(0)
    scenes = sample_scenes(rng, 1000, combos=pretraining_combos(), domain=PRETRAIN_DOMAIN)
    images, masks = render(scenes, rng)   # (N, 32, 32, 3) uint8, (N, 32, 32) float32
    texts = captions(scenes, rng)         # N strings
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "heart",
    "cross",
    "ring",
    "hexagon",
    "crescent",
    "pentagon",
    "arrow",
)
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.60, 0.20, 0.85),
    "pink": (1.00, 0.50, 0.75),
    "cyan": (0.10, 0.85, 0.90),
    "brown": (0.55, 0.33, 0.12),
    "white": (0.97, 0.97, 0.97),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_RADIUS: dict[str, tuple[float, float]] = {  # radius range, in units of half the image
    "small": (0.30, 0.38),
    "medium": (0.42, 0.52),
    "large": (0.56, 0.68),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "dots", "noise", "gradient", "grid")
BACKGROUND_WORDS: dict[str, str] = {
    "plain": "plain",
    "stripes": "striped",
    "checker": "checkered",
    "dots": "dotted",
    "noise": "noisy",
    "gradient": "gradient",
    "grid": "grid",
}
STYLES: tuple[str, ...] = ("photo", "sketch", "noise", "recolor")

# One colour per shape is never drawn nor named during pretraining: (colour, shape) pairs.
HELD_OUT: tuple[tuple[str, str], ...] = tuple(
    (COLOR_NAMES[(3 * i + 1) % len(COLOR_NAMES)], shape) for i, shape in enumerate(SHAPES)
)


def all_combos() -> list[tuple[str, str]]:
    """Every (colour, shape) pair of the world, colour-major."""
    return [(c, s) for c in COLOR_NAMES for s in SHAPES]


def pretraining_combos() -> list[tuple[str, str]]:
    """The (colour, shape) pairs drawn during pretraining: all pairs except HELD_OUT."""
    held = set(HELD_OUT)
    return [pair for pair in all_combos() if pair not in held]


@dataclass(frozen=True)
class Domain:
    """Distribution of nuisance attributes: backgrounds, sizes, jitter, blur, styles."""

    backgrounds: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
    bg_brightness: tuple[float, float] = (0.05, 0.40)
    sizes: tuple[str, ...] = SIZES
    color_jitter: float = 0.04
    pixel_noise: tuple[float, float] = (0.0, 0.04)
    blur: float = 0.0
    style_probs: tuple[tuple[str, float], ...] = (("photo", 1.0),)


PRETRAIN_DOMAIN = Domain(
    style_probs=(("photo", 0.82), ("sketch", 0.06), ("noise", 0.06), ("recolor", 0.06)),
)
# Downstream shift: unseen background textures, brighter backgrounds, no small objects,
# stronger colour jitter and a mild blur.
DOWNSTREAM_DOMAIN = Domain(
    backgrounds=("noise", "gradient", "grid"),
    bg_brightness=(0.35, 0.65),
    sizes=("medium", "large"),
    color_jitter=0.15,
    pixel_noise=(0.04, 0.10),
    blur=1.0,
)


@dataclass
class Scenes:
    """Attributes of N scenes (structure of arrays). Indices refer to the module tuples."""

    color: np.ndarray  # (N,) int, index into COLOR_NAMES
    shape: np.ndarray  # (N,) int, index into SHAPES
    size: np.ndarray  # (N,) int, index into SIZES
    center: np.ndarray  # (N, 2) float, (x, y) in [-1, 1], y pointing down
    radius: np.ndarray  # (N,) float, in units of half the image
    angle: np.ndarray  # (N,) float, rotation in radians
    background: np.ndarray  # (N,) int, index into BACKGROUNDS
    bg_colors: np.ndarray  # (N, 2, 3) float, the two background colours
    bg_period: np.ndarray  # (N,) float, texture period in pixels (fraction of 32 px)
    bg_angle: np.ndarray  # (N,) float, texture orientation in radians
    obj_rgb: np.ndarray  # (N, 3) float, jittered object colour
    style: np.ndarray  # (N,) int, index into STYLES
    noise_sigma: np.ndarray  # (N,) float, std of additive pixel noise
    blur: float = 0.0

    def __len__(self) -> int:
        return len(self.color)

    def combo(self, i: int) -> tuple[str, str]:
        """(colour, shape) names of scene i."""
        return COLOR_NAMES[self.color[i]], SHAPES[self.shape[i]]


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    combos: list[tuple[str, str]],
    domain: Domain = PRETRAIN_DOMAIN,
    labels: np.ndarray | None = None,
) -> Scenes:
    """Draw n scenes whose (colour, shape) is combos[labels[i]] (uniform labels if None)."""
    if labels is None:
        labels = rng.integers(len(combos), size=n)
    color = np.array([COLOR_NAMES.index(combos[k][0]) for k in labels], dtype=np.int64)
    shape = np.array([SHAPES.index(combos[k][1]) for k in labels], dtype=np.int64)
    size = np.array([SIZES.index(s) for s in domain.sizes])[rng.integers(len(domain.sizes), size=n)]
    lo = np.array([SIZE_RADIUS[s][0] for s in SIZES])[size]
    hi = np.array([SIZE_RADIUS[s][1] for s in SIZES])[size]
    radius = rng.uniform(lo, hi)
    center = rng.uniform(-1, 1, size=(n, 2)) * (1.0 - radius)[:, None]
    bg_ids = np.array([BACKGROUNDS.index(b) for b in domain.backgrounds])
    level = rng.uniform(*domain.bg_brightness, size=(n, 1, 1))
    tint = rng.uniform(-0.08, 0.08, size=(n, 1, 3))
    contrast = rng.uniform(0.10, 0.22, size=(n, 1, 1)) * rng.choice([-1.0, 1.0], size=(n, 1, 1))
    bg_colors = np.clip(level + tint + np.stack([np.zeros((n, 1)), contrast[:, 0]], 1), 0, 1)
    base_rgb = np.array([COLORS[c] for c in COLOR_NAMES])[color]
    obj_rgb = np.clip(base_rgb + rng.normal(0, domain.color_jitter, size=(n, 3)), 0, 1)
    names, probs = zip(*domain.style_probs, strict=True)
    style_ids = np.array([STYLES.index(s) for s in names])
    return Scenes(
        color=color,
        shape=shape,
        size=size,
        center=center,
        radius=radius,
        angle=rng.uniform(-0.26, 0.26, size=n),
        background=bg_ids[rng.integers(len(bg_ids), size=n)],
        bg_colors=np.broadcast_to(bg_colors, (n, 2, 3)).copy(),
        bg_period=rng.uniform(4.0, 9.0, size=n),
        bg_angle=rng.uniform(0, np.pi, size=n),
        obj_rgb=obj_rgb,
        style=style_ids[rng.choice(len(style_ids), size=n, p=np.array(probs) / sum(probs))],
        noise_sigma=rng.uniform(*domain.pixel_noise, size=n),
        blur=domain.blur,
    )


# ---------------------------------------------------------------- shape masks
# Each function maps local coordinates (u, v) of shape (M, H, W), with v pointing up and the
# shape's circumradius 1, to a boolean mask.


def _polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    sector = 2 * np.pi / sides
    phi = np.mod(theta - np.pi / 2, sector) - sector / 2
    return r * np.cos(phi) <= 0.95 * np.cos(np.pi / sides)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    sector = 2 * np.pi / points
    alpha = np.abs(np.mod(theta - np.pi / 2 + sector / 2, sector) - sector / 2)  # from a tip
    px, py = r * np.cos(alpha), r * np.sin(alpha)
    ix, iy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)  # inner vertex; tip at (1,0)
    return (ix - 1.0) * py - iy * (px - 1.0) >= 0  # origin side of the tip-inner edge


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, 1.15 * v + 0.1
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (np.abs(v) < 0.22) & (u > -0.95) & (u < 0.2)
    head = (u >= 0.1) & (np.abs(v) <= 0.65 * (0.95 - u) / 0.85)
    return shaft | head


SHAPE_MASKS = {
    "circle": lambda u, v: np.hypot(u, v) <= 0.92,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.75,
    "triangle": lambda u, v: _polygon(u, v + 0.2, 3),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 0.98,
    "star": _star,
    "heart": _heart,
    "cross": lambda u, v: (
        ((np.abs(u) < 0.3) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.3) & (np.abs(u) < 0.95))
    ),
    "ring": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u, v) >= 0.55),
    "hexagon": lambda u, v: _polygon(u, v, 6),
    "crescent": lambda u, v: (np.hypot(u, v) <= 0.95) & (np.hypot(u - 0.45, v) >= 0.75),
    "pentagon": lambda u, v: _polygon(u, v, 5),
    "arrow": _arrow,
}


# ---------------------------------------------------------------- rendering


def _object_masks(scenes: Scenes, size: int, supersample: int = 2) -> np.ndarray:
    """Boolean object masks at supersampled resolution, (N, size*ss, size*ss)."""
    hs = size * supersample
    g = (np.arange(hs, dtype=np.float32) + 0.5) / hs * 2 - 1
    dx = g[None, None, :] - scenes.center[:, 0, None, None].astype(np.float32)
    dy = g[None, :, None] - scenes.center[:, 1, None, None].astype(np.float32)
    cos, sin = np.cos(scenes.angle)[:, None, None], np.sin(scenes.angle)[:, None, None]
    rad = scenes.radius[:, None, None]
    u = ((cos * dx + sin * dy) / rad).astype(np.float32)
    v = ((sin * dx - cos * dy) / rad).astype(np.float32)  # minus: image rows point down
    masks = np.zeros((len(scenes), hs, hs), dtype=bool)
    for k, name in enumerate(SHAPES):
        idx = np.flatnonzero(scenes.shape == k)
        if len(idx):
            masks[idx] = SHAPE_MASKS[name](u[idx], v[idx])
    return masks


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion of (N, H, W) masks, repeated `steps` times."""
    for _ in range(steps):
        p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        mask = mask & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]
    return mask


def _backgrounds(scenes: Scenes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background images (N, size, size, 3) float32 in [0, 1]."""
    n = len(scenes)
    g = np.arange(size, dtype=np.float32) * 32.0 / size  # texture units: pixels of a 32 px image
    gx, gy = g[None, None, :], g[:, None][None]
    period = scenes.bg_period[:, None, None].astype(np.float32)
    cos = np.cos(scenes.bg_angle)[:, None, None].astype(np.float32)
    sin = np.sin(scenes.bg_angle)[:, None, None].astype(np.float32)
    along = gx * cos + gy * sin
    weight = np.zeros((n, size, size), dtype=np.float32)
    for k, name in enumerate(BACKGROUNDS):
        i = np.flatnonzero(scenes.background == k)
        if not len(i):
            continue
        if name == "stripes":
            w = np.floor(along[i] / period[i]) % 2
        elif name == "checker":
            w = (np.floor(gx / period[i]) + np.floor(gy / period[i])) % 2
        elif name == "dots":
            ox, oy = gx % period[i] - period[i] / 2, gy % period[i] - period[i] / 2
            w = np.hypot(ox, oy) < period[i] * 0.3
        elif name == "noise":
            coarse = rng.uniform(size=(len(i), size // 4, size // 4)).astype(np.float32)
            fine = rng.uniform(size=(len(i), size, size))
            w = 0.6 * coarse.repeat(4, 1).repeat(4, 2) + 0.4 * fine
        elif name == "gradient":
            w = (along[i] + 32 * 1.5) / (32 * 3.0)
        elif name == "grid":
            w = (gx % period[i] < 1.0) | (gy % period[i] < 1.0)
        else:  # plain
            w = np.zeros((len(i), size, size))
        weight[i] = w
    c1, c2 = scenes.bg_colors[:, 0, None, None, :], scenes.bg_colors[:, 1, None, None, :]
    return (c1 * (1 - weight[..., None]) + c2 * weight[..., None]).astype(np.float32)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W, 3) images, radius 2 px, edge padding."""
    x = np.arange(-2, 3, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        p = np.pad(images, pad, mode="edge")
        n = images.shape[axis]
        images = sum(w * np.take(p, np.arange(j, j + n), axis=axis) for j, w in enumerate(k))
    return images


def _render_chunk(
    scenes: Scenes, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    ss = 2
    masks = _object_masks(scenes, size, ss)
    sketch = scenes.style == STYLES.index("sketch")
    if sketch.any():
        masks[sketch] &= ~_erode(masks[sketch], 2)
    n = len(scenes)
    alpha = masks.reshape(n, size, ss, size, ss).mean(axis=(2, 4), dtype=np.float32)
    bg = _backgrounds(scenes, size, rng)
    rgb = scenes.obj_rgb.astype(np.float32).copy()
    recolor = scenes.style == STYLES.index("recolor")
    bg[recolor] = 1.0 - bg[recolor]  # bright backgrounds
    rgb[recolor] *= 0.65  # same hue, darker object
    img = bg * (1 - alpha[..., None]) + rgb[:, None, None, :] * alpha[..., None]
    if scenes.blur > 0:
        img = _blur(img, scenes.blur)
    sigma = scenes.noise_sigma.astype(np.float32).copy()
    sigma[scenes.style == STYLES.index("noise")] += 0.25
    img = img + rng.normal(size=img.shape).astype(np.float32) * sigma[:, None, None, None]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), alpha


def subset(scenes: Scenes, idx: np.ndarray | slice) -> Scenes:
    """Scenes restricted to the given indices."""
    fields = {k: (v[idx] if isinstance(v, np.ndarray) else v) for k, v in vars(scenes).items()}
    return Scenes(**fields)


def render(
    scenes: Scenes, rng: np.random.Generator, image_size: int = 32, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Render scenes to images (N, S, S, 3) uint8 and object coverage (N, S, S) float32."""
    if not 32 <= image_size <= 64 or image_size % 4:
        raise ValueError("image_size must be a multiple of 4 between 32 and 64")
    images = np.empty((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    alphas = np.empty((len(scenes), image_size, image_size), dtype=np.float32)
    for start in range(0, len(scenes), chunk):
        sl = slice(start, start + chunk)
        images[sl], alphas[sl] = _render_chunk(subset(scenes, sl), image_size, rng)
    return images, alphas


# ---------------------------------------------------------------- captions

_TEMPLATES = (
    "a photo of a {color} {shape}.",
    "a photo of {a_obj}.",
    "{a_sized} on a {bg} background.",
    "a drawing of a {shape} that is {color}.",
    "a picture of {a_obj} in the {pos}.",
    "there is {a_obj} in the {pos} of the image.",
    "{a_sized}.",
    "{color} {shape}",
    "an image of {a_sized} on a {bg} background.",
    "a {shape} colored {color}.",
    "a {color} {shape} on a {bg} background.",
    "a {shape}.",
    "something {color}.",
    "a rendering of the {color} {shape}.",
)
_STYLE_TEMPLATES = {
    "sketch": ("a sketch of {a_obj}.", "an outline drawing of {a_obj}.", "a sketch of a {shape}."),
    "noise": ("a noisy photo of {a_obj}.", "a grainy picture of {a_obj}."),
    "recolor": ("a photo of {a_obj} on a bright background.", "a pale image of {a_obj}."),
}


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position(x: float, y: float) -> str:
    vert = "top" if y < -0.2 else "bottom" if y > 0.2 else ""
    horiz = "left" if x < -0.2 else "right" if x > 0.2 else ""
    return f"{vert} {horiz}".strip() or "center"


def captions(scenes: Scenes, rng: np.random.Generator) -> list[str]:
    """One randomly phrased caption per scene, naming its colour and (mostly) its shape."""
    out = []
    for i in range(len(scenes)):
        color, shape = scenes.combo(i)
        style = STYLES[scenes.style[i]]
        size = SIZES[scenes.size[i]]
        sized = f"{size} {color} {shape}" if size != "medium" else f"{color} {shape}"
        if style != "photo" and rng.uniform() < 0.7:
            options = _STYLE_TEMPLATES[style]
        else:
            options = _TEMPLATES
        template = options[rng.integers(len(options))]
        out.append(
            template.format(
                color=color,
                shape=shape,
                a_obj=_article(f"{color} {shape}"),
                a_sized=_article(sized),
                bg=BACKGROUND_WORDS[BACKGROUNDS[scenes.background[i]]],
                pos=_position(*scenes.center[i]),
            )
        )
    return out
