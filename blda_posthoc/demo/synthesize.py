"""A procedural synthetic street-scene benchmark for unsupervised domain adaptation.

Scenes are rendered with a pinhole camera 1.5 m above a flat street: a road and sidewalks in
perspective, building facades and hedges along both sides (some with signs fixed to the wall),
sky above, and objects (cars, people, poles carrying one or two traffic signs, trees) drawn far to
near. Poles and signs stay the rarest, thinnest classes (under about 1 % of pixels each). Two
domains share the geometry generator but differ in class frequencies (label shift) and in
rendering (appearance shift):

* ``source``: saturated daylight colours, sharp, clean; wide roads with many cars.
* ``target``: an overcast dusk: darker, blue-grey cast, haze, blur and sensor noise, duller
  sidewalks, facades and cars, darker clothes; narrower roads, wider sidewalks, fewer cars, more
  people, poles and signs.

Everything is pure numpy and deterministic given a :class:`numpy.random.Generator`; use
:func:`render_indexed` for per-image seeding. Label maps hold trainIds ``0..C-1`` in the order
of :data:`DEMO_CLASSES` and 255 (ignore) on part of the car borders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from blda_posthoc.core.classes import IGNORE_INDEX

DEMO_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "pole",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "car",
)
"""The demo's classes (Cityscapes names, so the Cityscapes palette applies), trainIds in order."""

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = range(10)

DOMAINS: tuple[str, ...] = ("source", "target")
"""The two domains: labelled source for training, shifted target for adaptation."""

DEFAULT_SIZE = (128, 256)
"""Default ``(H, W)`` of a rendered scene."""

CAMERA_HEIGHT = 1.5
"""Camera height above the street in metres."""

FAR_DEPTH = 90.0
"""Depth in metres of the skyline wall that closes the street."""

Colour = tuple[float, float, float]


@dataclass(frozen=True)
class DomainStyle:
    """How a domain lays out and renders its scenes.

    Attributes:
        name: Domain name.
        road_width: Range of the road width in metres.
        sidewalk_width: Range of each sidewalk's width in metres.
        cars: Range (inclusive) of the number of cars.
        people: Range (inclusive) of the number of people.
        poles: Range (inclusive) of the number of poles per side.
        sign_prob: Probability that a pole carries a traffic sign.
        wall_signs: Range (inclusive) of the number of signs fixed to building facades per side.
        trees: Range (inclusive) of the number of trees per side.
        building_prob: Probability that a facade segment is a building (else hedge or gap).
        colours: Base RGB colour in ``[0, 1]`` per material name.
        car_colours: Car body colours to draw from.
        cloth_colours: Clothing colours to draw from.
        saturation: Saturation factor (1 keeps colours).
        brightness: Global brightness factor.
        cast: Per-channel colour cast factors.
        haze: Strength of the haze near the horizon, in ``[0, 1]``.
        blur: Gaussian blur sigma in pixels (0 for none).
        noise: Standard deviation of the sensor noise, in ``[0, 1]`` units.
        gamma: Gamma applied last (above 1 darkens mid-tones).
    """

    name: str
    road_width: tuple[float, float]
    sidewalk_width: tuple[float, float]
    cars: tuple[int, int]
    people: tuple[int, int]
    poles: tuple[int, int]
    sign_prob: float
    wall_signs: tuple[int, int]
    trees: tuple[int, int]
    building_prob: float
    colours: dict[str, Colour]
    car_colours: tuple[Colour, ...]
    cloth_colours: tuple[Colour, ...]
    saturation: float
    brightness: float
    cast: Colour
    haze: float
    blur: float
    noise: float
    gamma: float


SOURCE_STYLE = DomainStyle(
    name="source",
    road_width=(7.0, 12.0),
    sidewalk_width=(1.5, 3.0),
    cars=(3, 8),
    people=(0, 3),
    poles=(1, 2),
    sign_prob=0.6,
    wall_signs=(0, 1),
    trees=(0, 2),
    building_prob=0.7,
    colours={
        "sky": (0.35, 0.6, 0.95),
        "road": (0.36, 0.34, 0.38),
        "marking": (0.95, 0.95, 0.9),
        "sidewalk": (0.78, 0.62, 0.6),
        "terrain": (0.55, 0.75, 0.3),
        "building": (0.75, 0.55, 0.4),
        "window": (0.25, 0.35, 0.55),
        "vegetation": (0.2, 0.6, 0.15),
        "trunk": (0.4, 0.28, 0.15),
        "pole": (0.55, 0.55, 0.6),
        "skin": (0.9, 0.7, 0.55),
    },
    car_colours=((0.85, 0.1, 0.1), (0.1, 0.25, 0.85), (0.95, 0.95, 0.95), (0.9, 0.75, 0.1)),
    cloth_colours=((0.9, 0.2, 0.2), (0.2, 0.3, 0.9), (0.95, 0.85, 0.2), (0.2, 0.7, 0.3)),
    saturation=1.15,
    brightness=1.0,
    cast=(1.0, 1.0, 1.0),
    haze=0.05,
    blur=0.0,
    noise=0.01,
    gamma=1.0,
)
"""Source domain: sunny, saturated, sharp; car-heavy streets."""

TARGET_STYLE = DomainStyle(
    name="target",
    road_width=(5.0, 8.0),
    sidewalk_width=(2.5, 5.0),
    cars=(0, 3),
    people=(2, 7),
    poles=(2, 4),
    sign_prob=0.75,
    wall_signs=(1, 2),
    trees=(0, 2),
    building_prob=0.75,
    colours={
        "sky": (0.49, 0.63, 0.84),
        "road": (0.35, 0.34, 0.37),
        "marking": (0.88, 0.88, 0.84),
        "sidewalk": (0.64, 0.55, 0.55),
        "terrain": (0.5, 0.62, 0.3),
        "building": (0.65, 0.54, 0.45),
        "window": (0.28, 0.34, 0.45),
        "vegetation": (0.23, 0.48, 0.17),
        "trunk": (0.35, 0.27, 0.18),
        "pole": (0.48, 0.48, 0.51),
        "skin": (0.83, 0.65, 0.53),
    },
    car_colours=((0.7, 0.15, 0.15), (0.2, 0.3, 0.7), (0.9, 0.9, 0.9), (0.25, 0.25, 0.28)),
    cloth_colours=((0.6, 0.2, 0.2), (0.2, 0.25, 0.55), (0.3, 0.3, 0.35), (0.7, 0.6, 0.25)),
    saturation=0.85,
    brightness=0.85,
    cast=(0.92, 0.97, 1.1),
    haze=0.25,
    blur=0.7,
    noise=0.025,
    gamma=1.05,
)
"""Target domain: overcast dusk, hazy, blurred, noisy, duller; sidewalk- and pedestrian-heavy."""

STYLES: dict[str, DomainStyle] = {"source": SOURCE_STYLE, "target": TARGET_STYLE}

SIGN_COLOURS: tuple[Colour, ...] = ((0.9, 0.1, 0.1), (0.1, 0.3, 0.85), (0.95, 0.8, 0.1))
"""Sign face colours (regulatory red, informational blue, warning yellow); every plate has a
white rim, as real signs do."""

SIGN_RIM: Colour = (0.95, 0.95, 0.95)
"""Colour of a sign's retro-reflective rim."""


def domain_style(domain: str) -> DomainStyle:
    """Return the :class:`DomainStyle` of ``domain`` (one of :data:`DOMAINS`)."""
    if domain not in STYLES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    return STYLES[domain]


@dataclass
class Camera:
    """Pinhole camera looking down a flat street.

    Attributes:
        height: Image height in pixels.
        width: Image width in pixels.
        focal: Focal length in pixels.
        horizon: Row of the horizon (may be fractional).
        centre: Column of the vanishing point.
    """

    height: int
    width: int
    focal: float
    horizon: float
    centre: float

    def ground_row(self, depth: float) -> float:
        """Image row of the ground at ``depth`` metres."""
        return self.horizon + self.focal * CAMERA_HEIGHT / depth

    def column(self, lateral: float, depth: float) -> float:
        """Image column of lateral offset ``lateral`` metres at ``depth`` metres."""
        return self.centre + self.focal * lateral / depth


@dataclass
class Canvas:
    """Label map and colour picture being painted.

    Attributes:
        label: ``(H, W)`` uint8 trainIds.
        rgb: ``(H, W, 3)`` float32 colours in ``[0, 1]``.
        ignore: ``(H, W)`` bool, pixels that become 255 in the final label.
    """

    label: np.ndarray
    rgb: np.ndarray
    ignore: np.ndarray


@dataclass
class Street:
    """The street's cross-section in metres (lateral offsets, left negative).

    Attributes:
        road_left: Left road edge (negative).
        road_right: Right road edge (positive).
        walk_left: Outer edge of the left sidewalk.
        walk_right: Outer edge of the right sidewalk.
        facade_left: Lateral offset of the left facades.
        facade_right: Lateral offset of the right facades.
    """

    road_left: float
    road_right: float
    walk_left: float
    walk_right: float
    facade_left: float
    facade_right: float


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _count(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _jitter(rng: np.random.Generator, colour: Colour, amount: float = 0.06) -> np.ndarray:
    """A colour with a small random offset, shape ``(3,)``."""
    return np.clip(np.asarray(colour) + rng.normal(0.0, amount, 3), 0.0, 1.0).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Low-frequency noise in ``[-1, 1]``: a coarse random grid bilinearly upsampled.

    Args:
        rng: Random generator.
        shape: ``(H, W)`` of the output.
        cell: Grid spacing in pixels.

    Returns:
        ``(H, W)`` float32 array.
    """
    h, w = shape
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    ys = np.arange(h, dtype=np.float32) / cell
    xs = np.arange(w, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur an ``(H, W, 3)`` float image with a separable Gaussian (edge padding)."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    rows = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    padded = np.pad(rows, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(k * padded[:, i : i + w] for i, k in enumerate(kernel)).astype(np.float32)


def _make_camera(rng: np.random.Generator, height: int, width: int) -> Camera:
    return Camera(
        height=height,
        width=width,
        focal=0.75 * width,
        horizon=height * float(rng.uniform(0.36, 0.48)),
        centre=width * float(rng.uniform(0.42, 0.58)),
    )


def _make_street(rng: np.random.Generator, style: DomainStyle) -> Street:
    road = _uniform(rng, style.road_width)
    left = -road * float(rng.uniform(0.3, 0.7))
    right = left + road
    walk_left = left - _uniform(rng, style.sidewalk_width)
    walk_right = right + _uniform(rng, style.sidewalk_width)
    verge = [float(rng.uniform(0.5, 2.5)) if rng.random() < 0.4 else 0.0 for _ in range(2)]
    return Street(left, right, walk_left, walk_right, walk_left - verge[0], walk_right + verge[1])


def _paint(canvas: Canvas, mask: np.ndarray, cls: int, colour: np.ndarray) -> None:
    """Set ``mask`` pixels to class ``cls`` and colour ``colour`` (``(3,)`` or ``(M, 3)``)."""
    canvas.label[mask] = cls
    canvas.rgb[mask] = colour
    canvas.ignore[mask] = False


def _paint_sky(canvas: Canvas, cam: Camera, style: DomainStyle, rng: np.random.Generator) -> None:
    h, w = canvas.label.shape
    rows = np.arange(h, dtype=np.float32)[:, None, None]
    lift = np.clip(1.0 - rows / max(cam.horizon, 1.0), 0.0, 1.0)
    base = _jitter(rng, style.colours["sky"], 0.04)
    clouds = np.clip(smooth_noise(rng, (h, w), 24), 0.0, 1.0)[:, :, None]
    sky = base * (0.75 + 0.35 * (1 - lift)) * (1 - 0.6 * clouds) + 0.9 * 0.6 * clouds
    everywhere = np.ones((h, w), bool)
    _paint(canvas, everywhere, SKY, sky[everywhere])


def _ground_geometry(cam: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lateral offset, depth and a below-horizon mask for every pixel, each ``(H, W)``."""
    rows = np.arange(cam.height, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(cam.width, dtype=np.float32)[None, :] + 0.5
    drop = np.maximum(rows - cam.horizon, 1e-3)
    depth = np.broadcast_to(cam.focal * CAMERA_HEIGHT / drop, (cam.height, cam.width))
    lateral = (cols - cam.centre) * CAMERA_HEIGHT / drop
    below = np.broadcast_to(rows > cam.horizon, depth.shape) & (depth < FAR_DEPTH)
    return lateral, depth, below


def _paint_ground(
    canvas: Canvas, cam: Camera, street: Street, style: DomainStyle, rng: np.random.Generator
) -> None:
    lateral, depth, below = _ground_geometry(cam)
    grain = rng.normal(0.0, 0.03, lateral.shape).astype(np.float32)[..., None]
    stain = 0.08 * smooth_noise(rng, lateral.shape, 16)[..., None]
    road = below & (lateral >= street.road_left) & (lateral <= street.road_right)
    walk = below & ~road & (lateral >= street.walk_left) & (lateral <= street.walk_right)
    verge = below & ~road & ~walk
    texture = grain + stain
    road_rgb = _jitter(rng, style.colours["road"], 0.03) + texture
    lane = street.road_left + (street.road_right - street.road_left) * float(rng.uniform(0.4, 0.6))
    dash = (np.abs(lateral - lane) < 0.09) & ((depth // 3.0) % 2 == 0)
    road_rgb = np.where(dash[..., None], np.asarray(style.colours["marking"]), road_rgb)
    _paint(canvas, road, ROAD, road_rgb[road])
    tiles = ((lateral % 0.8) < 0.06) | ((depth % 0.8) < 0.06)
    walk_rgb = _jitter(rng, style.colours["sidewalk"], 0.04) + texture - 0.12 * tiles[..., None]
    _paint(canvas, walk, SIDEWALK, walk_rgb[walk])
    terrain_rgb = _jitter(rng, style.colours["terrain"], 0.05) + 2.0 * texture
    _paint(canvas, verge, TERRAIN, terrain_rgb[verge])


def _segments(
    rng: np.random.Generator, style: DomainStyle
) -> list[tuple[float, float, int, float]]:
    """Facade segments along one side: ``(start depth, end depth, kind, height in metres)``.

    ``kind`` is :data:`BUILDING`, :data:`VEGETATION` (a hedge or tree wall) or -1 (a gap).
    """
    segments = []
    start = 0.5
    while start < FAR_DEPTH:
        length = float(rng.uniform(6.0, 25.0))
        roll = rng.random()
        if roll < style.building_prob:
            kind, tall = BUILDING, float(rng.uniform(6.0, 25.0))
        elif roll < style.building_prob + 0.6 * (1 - style.building_prob):
            kind, tall = VEGETATION, float(rng.uniform(1.5, 7.0))
        else:
            kind, tall = -1, 0.0
        segments.append((start, start + length, kind, tall))
        start += length
    return segments


def _paint_facades(
    canvas: Canvas,
    cam: Camera,
    offset: float,
    style: DomainStyle,
    rng: np.random.Generator,
) -> None:
    """Paint one side's facades, a vertical plane at lateral ``offset`` metres."""
    h, w = canvas.label.shape
    cols = np.arange(w, dtype=np.float32) + 0.5
    side = (cols - cam.centre) * np.sign(offset) > 0.5
    depth = np.full(w, 1e6, dtype=np.float32)  # columns that never see this side
    depth[side] = cam.focal * offset / (cols[side] - cam.centre)
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    height = CAMERA_HEIGHT - (rows - cam.horizon) * depth[None, :] / cam.focal
    segments = _segments(rng, style)
    starts = np.asarray([s[0] for s in segments])
    index = np.clip(np.searchsorted(starts, depth, side="right") - 1, 0, len(segments) - 1)
    kinds = np.asarray([s[2] for s in segments])[index]
    tops = np.asarray([s[3] for s in segments])[index]
    visible = (depth < FAR_DEPTH)[None, :] & (height >= 0) & (height <= tops[None, :])
    colours = [_jitter(rng, style.colours["building"], 0.12) for _ in segments]
    tint = np.stack(colours)[index][None, :, :] * np.ones((h, 1, 1), np.float32)
    windows = ((depth % 3.0) > 1.0)[None, :] & ((height % 3.2) > 1.2) & (height > 1.0)
    wall = tint + 0.04 * smooth_noise(rng, (h, w), 8)[..., None]
    wall = np.where(windows[..., None], _jitter(rng, style.colours["window"], 0.05), wall)
    building = visible & (kinds == BUILDING)[None, :]
    _paint(canvas, building, BUILDING, wall[building])
    hedge = visible & (kinds == VEGETATION)[None, :]
    _paint(canvas, hedge, VEGETATION, _foliage(rng, style, (h, w))[hedge])
    _paint_wall_signs(canvas, depth, height, segments, building, style, rng)


def _paint_wall_signs(
    canvas: Canvas,
    depth: np.ndarray,
    height: np.ndarray,
    segments: list[tuple[float, float, int, float]],
    building: np.ndarray,
    style: DomainStyle,
    rng: np.random.Generator,
) -> None:
    """Signs fixed flat to one side's building facades, 2.3 to 4.5 m above the pavement.

    Street-name plates, direction and shop signs: a coloured face inside a white rim, drawn in
    the facade plane (so in perspective) on buildings nearer than 40 m.

    Args:
        canvas: The canvas, facades already painted.
        depth: ``(W,)`` depth in metres of the facade plane per column.
        height: ``(H, W)`` height in metres above the ground of the facade plane per pixel.
        segments: The side's facade segments (see :func:`_segments`).
        building: ``(H, W)`` mask of the visible building pixels of this side.
        style: The domain style.
        rng: Random generator.
    """
    near = [seg for seg in segments if seg[2] == BUILDING and seg[0] < 40.0 and seg[3] > 5.0]
    for _ in range(_count(rng, style.wall_signs)):
        if not near:
            return
        start, end, _, _ = near[int(rng.integers(len(near)))]
        wide, tall = float(rng.uniform(0.8, 2.0)), float(rng.uniform(0.45, 0.8))
        first = max(start, 4.0)
        z0 = float(rng.uniform(first, max(first, min(end, 40.0) - wide)))
        h0 = float(rng.uniform(2.3, 4.5))
        face = _jitter(rng, SIGN_COLOURS[int(rng.integers(len(SIGN_COLOURS)))], 0.05)
        rim = 0.06
        for inset, colour in ((0.0, np.asarray(SIGN_RIM, np.float32)), (rim, face)):
            along = (depth >= z0 + inset) & (depth <= z0 + wide - inset)
            up = (height >= h0 + inset) & (height <= h0 + tall - inset)
            _paint(canvas, building & along[None, :] & up, SIGN, colour)


def _foliage(rng: np.random.Generator, style: DomainStyle, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` leafy texture: the vegetation colour with fine and coarse noise."""
    base = _jitter(rng, style.colours["vegetation"], 0.05)
    fine = rng.normal(0.0, 0.07, shape).astype(np.float32)
    coarse = 0.1 * smooth_noise(rng, shape, 4)
    return np.clip(base * (1.0 + 2.0 * (fine + coarse))[..., None], 0.0, 1.0)


def _paint_skyline(
    canvas: Canvas, cam: Camera, style: DomainStyle, rng: np.random.Generator
) -> None:
    """The far end of the street: a wall of distant buildings of varying height."""
    h, w = canvas.label.shape
    widths = rng.integers(6, 30, size=w)
    steps = np.repeat(rng.uniform(3.0, 30.0, size=w), widths)[:w]
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    height = CAMERA_HEIGHT + (cam.horizon - rows) * FAR_DEPTH / cam.focal
    mask = (height <= steps[None, :]) & (rows <= cam.horizon + 1)
    colour = _jitter(rng, style.colours["building"], 0.05) * 0.85
    _paint(canvas, mask, BUILDING, colour)


Drawer = Callable[[Canvas], None]


def _box(cam: Camera, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
    """Pixel slices of the box ``[x0, x1) x [y0, y1)`` (at least one pixel wide), or None."""
    c0, c1 = int(np.floor(x0)), max(int(np.floor(x0)) + 1, int(np.round(x1)))
    r0, r1 = int(np.floor(y0)), max(int(np.floor(y0)) + 1, int(np.round(y1)))
    c0, r0 = max(c0, 0), max(r0, 0)
    c1, r1 = min(c1, cam.width), min(r1, cam.height)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _fill_box(
    canvas: Canvas,
    cam: Camera,
    bounds: tuple[float, float, float, float],
    cls: int,
    rgb: np.ndarray,
) -> None:
    box = _box(cam, *bounds)
    if box is None:
        return
    canvas.label[box] = cls
    canvas.rgb[box] = rgb
    canvas.ignore[box] = False


def _fill_ellipse(
    canvas: Canvas,
    cam: Camera,
    centre: tuple[float, float],
    radii: tuple[float, float],
    cls: int,
    rgb: np.ndarray,
) -> None:
    """Fill the ellipse with centre ``(x, y)`` and radii ``(rx, ry)`` in pixels."""
    (cx, cy), (rx, ry) = centre, (max(radii[0], 0.6), max(radii[1], 0.6))
    box = _box(cam, cx - rx, cx + rx + 1, cy - ry, cy + ry + 1)
    if box is None:
        return
    rows = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5
    inside = ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1.0
    canvas.label[box][inside] = cls
    canvas.rgb[box][inside] = rgb if rgb.ndim == 1 else rgb[box][inside]
    canvas.ignore[box][inside] = False


def _car(
    cam: Camera, lateral: float, depth: float, style: DomainStyle, rng: np.random.Generator
) -> Drawer:
    body = _jitter(rng, style.car_colours[int(rng.integers(len(style.car_colours)))], 0.05)
    glass = _jitter(rng, (0.12, 0.14, 0.18), 0.03)
    wide = float(rng.uniform(1.7, 2.0)) if rng.random() < 0.7 else float(rng.uniform(3.0, 4.5))
    tall = float(rng.uniform(1.35, 1.7))

    def draw(canvas: Canvas) -> None:
        s = cam.focal / depth
        cx, bottom = cam.column(lateral, depth), cam.ground_row(depth)
        half, top = 0.5 * wide * s, bottom - tall * s
        waist = bottom - 0.55 * tall * s
        before = canvas.label.copy()
        _fill_box(canvas, cam, (cx - half, cx + half, waist, bottom - 0.15 * tall * s), CAR, body)
        _fill_box(canvas, cam, (cx - 0.8 * half, cx + 0.8 * half, top, waist + 1), CAR, body)
        _fill_box(
            canvas, cam, (cx - 0.7 * half, cx + 0.7 * half, top + 0.1 * tall * s, waist), CAR, glass
        )
        tyre = np.asarray((0.05, 0.05, 0.05), np.float32)
        for edge in (cx - half, cx + 0.65 * half):
            _fill_box(
                canvas, cam, (edge, edge + 0.35 * half, bottom - 0.2 * tall * s, bottom), CAR, tyre
            )
        _mark_border(canvas, before, rng)

    return draw


def _mark_border(canvas: Canvas, before: np.ndarray, rng: np.random.Generator) -> None:
    """Mark a random quarter of a new car's outline pixels as ignore."""
    new = (canvas.label == CAR) & (before != CAR)
    edge = new.copy()
    edge[1:-1, 1:-1] = new[1:-1, 1:-1] & ~(
        new[:-2, 1:-1] & new[2:, 1:-1] & new[1:-1, :-2] & new[1:-1, 2:]
    )
    canvas.ignore |= edge & (rng.random(edge.shape) < 0.25)


def _person(
    cam: Camera, lateral: float, depth: float, style: DomainStyle, rng: np.random.Generator
) -> Drawer:
    shirt = _jitter(rng, style.cloth_colours[int(rng.integers(len(style.cloth_colours)))])
    trousers = _jitter(rng, style.cloth_colours[int(rng.integers(len(style.cloth_colours)))]) * 0.6
    skin = _jitter(rng, style.colours["skin"], 0.08)
    tall = float(rng.uniform(1.55, 1.95))

    def draw(canvas: Canvas) -> None:
        s = cam.focal / depth
        cx, bottom = cam.column(lateral, depth), cam.ground_row(depth)
        half = 0.22 * s
        hip, neck = bottom - 0.47 * tall * s, bottom - 0.85 * tall * s
        _fill_box(canvas, cam, (cx - half, cx - 0.15 * half, hip, bottom), PERSON, trousers)
        _fill_box(canvas, cam, (cx + 0.15 * half, cx + half, hip, bottom), PERSON, trousers)
        _fill_box(canvas, cam, (cx - 1.1 * half, cx + 1.1 * half, neck, hip + 1), PERSON, shirt)
        head = 0.1 * tall * s
        _fill_ellipse(canvas, cam, (cx, neck - head), (0.8 * head, head), PERSON, skin)

    return draw


def _pole(
    cam: Camera,
    lateral: float,
    depth: float,
    sign: bool,
    style: DomainStyle,
    rng: np.random.Generator,
) -> Drawer:
    metal = _jitter(rng, style.colours["pole"], 0.05)
    tall, thick = float(rng.uniform(4.0, 9.0)), float(rng.uniform(0.14, 0.25))
    lift = float(rng.uniform(2.2, 3.0))
    # One or two plates stacked on the pole: (round, half width, half height, face colour).
    plates = []
    for _ in range(2 if rng.random() < 0.3 else 1):
        face = _jitter(rng, SIGN_COLOURS[int(rng.integers(len(SIGN_COLOURS)))], 0.05)
        half = 0.5 * float(rng.uniform(0.6, 0.9))
        if rng.random() < 0.45:
            plates.append((True, half, half, face))
        elif rng.random() < 0.6:
            plates.append((False, half, half, face))
        else:  # a direction sign, wider than tall
            plates.append((False, float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.2, 0.3)), face))

    def draw(canvas: Canvas) -> None:
        s = cam.focal / depth
        cx, bottom = cam.column(lateral, depth), cam.ground_row(depth)
        _fill_box(
            canvas,
            cam,
            (cx - 0.5 * thick * s, cx + 0.5 * thick * s, bottom - tall * s, bottom),
            POLE,
            metal,
        )
        if not sign:
            return
        rim = np.asarray(SIGN_RIM, np.float32)
        base = lift
        for round_plate, half_w, half_h, face in plates:
            cy, rx, ry = bottom - (base + half_h) * s, half_w * s, half_h * s
            if round_plate:
                _fill_ellipse(canvas, cam, (cx, cy), (rx, ry), SIGN, rim)
                _fill_ellipse(canvas, cam, (cx, cy), (0.78 * rx, 0.78 * ry), SIGN, face)
            else:
                _fill_box(canvas, cam, (cx - rx, cx + rx, cy - ry, cy + ry), SIGN, rim)
                m = 0.2 * min(rx, ry)
                inner = (cx - rx + m, cx + rx - m, cy - ry + m, cy + ry - m)
                _fill_box(canvas, cam, inner, SIGN, face)
            base += 2.0 * half_h + 0.1

    return draw


def _tree(
    cam: Camera, lateral: float, depth: float, style: DomainStyle, rng: np.random.Generator
) -> Drawer:
    bark = _jitter(rng, style.colours["trunk"], 0.04)
    radius, crown = float(rng.uniform(1.2, 2.5)), float(rng.uniform(3.0, 5.0))
    leaves = _foliage(rng, style, (cam.height, cam.width))

    def draw(canvas: Canvas) -> None:
        s = cam.focal / depth
        cx, bottom = cam.column(lateral, depth), cam.ground_row(depth)
        _fill_box(
            canvas,
            cam,
            (cx - 0.15 * s, cx + 0.15 * s, bottom - crown * s, bottom),
            VEGETATION,
            bark,
        )
        radii = (radius * s, 0.8 * radius * s)
        _fill_ellipse(canvas, cam, (cx, bottom - crown * s), radii, VEGETATION, leaves)

    return draw


def _on_walk(rng: np.random.Generator, street: Street, outer: bool = False) -> float:
    """A lateral offset on a random sidewalk (near its outer edge when ``outer``)."""
    if rng.random() < 0.5:
        near, far = street.road_left, street.walk_left
    else:
        near, far = street.road_right, street.walk_right
    frac = float(rng.uniform(0.7, 0.95)) if outer else float(rng.uniform(0.15, 0.85))
    return near + frac * (far - near)


def _objects(
    cam: Camera, street: Street, style: DomainStyle, rng: np.random.Generator
) -> list[tuple[float, Drawer]]:
    """All objects of a scene as ``(depth, drawer)``."""
    items: list[tuple[float, Drawer]] = []
    for _ in range(_count(rng, style.cars)):
        depth = float(rng.uniform(4.0, 60.0))
        lateral = float(rng.uniform(street.road_left + 1.0, street.road_right - 1.0))
        items.append((depth, _car(cam, lateral, depth, style, rng)))
    for _ in range(_count(rng, style.people)):
        depth = float(rng.uniform(3.0, 35.0))
        lateral = (
            _on_walk(rng, street)
            if rng.random() < 0.85
            else float(rng.uniform(street.road_left, street.road_right))
        )
        items.append((depth, _person(cam, lateral, depth, style, rng)))
    for _ in range(2 * _count(rng, style.poles)):
        depth = float(rng.uniform(4.0, 60.0))
        sign = bool(rng.random() < style.sign_prob)
        items.append(
            (depth, _pole(cam, _on_walk(rng, street, outer=True), depth, sign, style, rng))
        )
    for _ in range(_count(rng, style.trees)):
        depth = float(rng.uniform(6.0, 50.0))
        items.append((depth, _tree(cam, _on_walk(rng, street, outer=True), depth, style, rng)))
    return items


def _finish(
    rgb: np.ndarray, cam: Camera, style: DomainStyle, rng: np.random.Generator
) -> np.ndarray:
    """Apply the domain's rendering: saturation, light, cast, haze, blur, noise, gamma.

    Args:
        rgb: ``(H, W, 3)`` float colours.
        cam: The scene's camera (for the horizon).
        style: The domain style.
        rng: Random generator.

    Returns:
        ``(H, W, 3)`` uint8 image.
    """
    grey = rgb.mean(axis=-1, keepdims=True)
    rgb = grey + style.saturation * (rgb - grey)
    light = style.brightness * float(rng.uniform(0.88, 1.12))
    rgb = rgb * light * np.asarray(style.cast, np.float32)
    rows = np.arange(cam.height, dtype=np.float32)[:, None, None]
    weight = style.haze * np.exp(-np.abs(rows - cam.horizon) / (0.2 * cam.height))
    rgb = (1 - weight) * rgb + weight * np.asarray((0.6, 0.62, 0.66), np.float32) * light
    rgb = gaussian_blur(rgb.astype(np.float32), style.blur)
    rgb = rgb + rng.normal(0.0, style.noise, rgb.shape).astype(np.float32)
    rgb = np.clip(rgb, 0.0, 1.0) ** style.gamma
    return np.round(rgb * 255.0).astype(np.uint8)


def render_scene(
    rng: np.random.Generator, domain: str, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene of ``domain``.

    Args:
        rng: Random generator; the scene depends only on its state.
        domain: ``"source"`` or ``"target"``.
        size: ``(H, W)`` in pixels.

    Returns:
        ``image`` ``(H, W, 3)`` uint8 RGB and ``label`` ``(H, W)`` uint8 trainIds in
        ``0..len(DEMO_CLASSES)-1``, with 255 (ignore) on some car borders.
    """
    style = domain_style(domain)
    height, width = size
    cam = _make_camera(rng, height, width)
    street = _make_street(rng, style)
    canvas = Canvas(
        label=np.zeros((height, width), np.uint8),
        rgb=np.zeros((height, width, 3), np.float32),
        ignore=np.zeros((height, width), bool),
    )
    _paint_sky(canvas, cam, style, rng)
    _paint_skyline(canvas, cam, style, rng)
    _paint_ground(canvas, cam, street, style, rng)
    for offset in (street.facade_left, street.facade_right):
        _paint_facades(canvas, cam, offset, style, rng)
    for _, draw in sorted(_objects(cam, street, style, rng), key=lambda item: -item[0]):
        draw(canvas)
    image = _finish(canvas.rgb, cam, style, rng)
    label = np.where(canvas.ignore, IGNORE_INDEX, canvas.label).astype(np.uint8)
    return image, label


def scene_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of ``domain``: independent of every other scene."""
    return np.random.default_rng([seed, DOMAINS.index(domain), index])


def render_indexed(
    seed: int, domain: str, index: int, size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Render scene ``index`` of ``domain`` for ``seed`` (see :func:`render_scene`)."""
    domain_style(domain)
    return render_scene(scene_rng(seed, domain, index), domain, size)


def class_frequencies(labels: np.ndarray, num_classes: int = len(DEMO_CLASSES)) -> np.ndarray:
    """Fraction of labelled pixels per class.

    Args:
        labels: ``(..., H, W)`` uint8 trainIds (255 ignored).
        num_classes: Number of classes C.

    Returns:
        ``(C,)`` float64 fractions summing to 1 (zeros when nothing is labelled).
    """
    counts = np.bincount(labels[labels != IGNORE_INDEX].ravel(), minlength=num_classes)
    total = counts.sum()
    return counts[:num_classes] / total if total else np.zeros(num_classes)
