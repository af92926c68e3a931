"""A synthetic aerial corpus: images, label maps and COCO instances, generated from a seed.

Each scene is textured ground with vegetation fields and tree crowns, water bodies, roads
(straight or curved bands that cross), buildings (rotated rectangles and L shapes, with
gable or flat roofs and cast shadows) and cars (small rotated boxes on the roads' lanes).
The label map is painted along with the pixels, so it is exact; shadows darken the pixels
they fall on but do not change their class.

A split is written under ``URI/SPLIT/``::

    images/SPLIT-NNNNN.jpg        the scenes (JPEG, quality 90)
    images/SPLIT-broken-K-*.*     deliberately broken files (truncated JPEG, empty file,
                                  text named .png), to show error handling
    labels/SPLIT-NNNNN.png        index PNG label maps: pixel value = class id (CLASSES)
    instances.json                COCO instances (buildings and cars, RLE, iscrowd 0)
    corpus.json                   the parameters that generated the split
    geotiff/SPLIT-NNNNN.tif       with ``geotiff=N``: the first N scenes again, as
                                  georeferenced GeoTIFF tiles (the ``geo`` extra)

so that ``segflow segment URI/SPLIT/images --gt masks:URI/SPLIT/labels`` (semantic models)
or ``--gt coco:URI/SPLIT/instances.json`` (instance models) evaluates a run. Every image is
generated from its own seed, ``[seed, split, index]``: splits never share a scene, and an
image does not depend on how many others were asked for.

The GeoTIFF tiles lie side by side, :data:`GEO_COLUMNS` to a row, as a mosaic over Downtown
Dubai in UTM zone 40N (EPSG:32640) at 0.3 m a pixel, so that the aerial scenes have the
scale of aerial imagery (cars 5–7 m, buildings 7–22 m). As at the edge of a survey, the
tiles on the mosaic's right and bottom edges have :data:`NODATA_MARGIN` pixels of nodata
there: pixel value 0 in every band, the GeoTIFF's nodata value (valid pixels are at least
1). Their label maps are the whole scenes'; the margins are the rasters' invalid pixels, which
no mask covers.

    python -m segflow.demo.corpus out/aerial --split train --images 200
    python -m segflow.demo.corpus out/aerial --split heldout --images 40 --large 3 --broken 3
    python -m segflow.demo.corpus out/aerial --split heldout --images 6 --geotiff 6
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from segflow import rle

# The one list of the corpus's classes: a label map's pixel value is the index here.
CLASSES = ("ground", "road", "building", "water", "vegetation", "car")
GROUND, ROAD, BUILDING, WATER, VEGETATION, CAR = range(len(CLASSES))
# Classes with instances in instances.json; COCO category id = position + 1, name = class.
THINGS = (BUILDING, CAR)
SPLITS = {"train": 0, "heldout": 1}
BROKEN_KINDS = ("truncated", "empty", "text")
DEFAULT_SIZE = (512, 512)
# Larger than segflow's default semantic tile (1024 px), so such images are tiled.
DEFAULT_LARGE_SIZE = (1300, 1100)
MIN_SIZE = 64  # (width, height) below which a scene has no room for its objects
JPEG_QUALITY = 90

# Label PNG palette, for viewing only: the pixel values are what count.
_LABEL_COLOURS = {
    GROUND: (160, 130, 90),
    ROAD: (128, 128, 128),
    BUILDING: (200, 60, 50),
    WATER: (40, 90, 200),
    VEGETATION: (50, 150, 50),
    CAR: (250, 220, 40),
}
_ROOF_COLOURS = np.array(
    [[172, 84, 62], [84, 84, 90], [182, 180, 174], [134, 98, 72], [214, 208, 198], [100, 112, 134]],
    np.float32,
)
_CAR_COLOURS = np.array(
    [[230, 230, 232], [30, 30, 34], [160, 162, 168], [180, 30, 30], [30, 60, 150], [40, 90, 60]],
    np.float32,
)
_SHADOW = 0.55  # brightness left in a cast shadow

GEO_CRS = "EPSG:32640"  # WGS 84 / UTM zone 40N
GEO_ORIGIN = (326000.0, 2788000.0)  # the mosaic's upper-left corner, metres (Downtown Dubai)
GEO_PIXEL = 0.3  # metres
GEO_COLUMNS = 3  # tiles to a row of the mosaic
NODATA_MARGIN = 64  # pixels of nodata along the mosaic's right and bottom edges


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8, ids into CLASSES
    instances: np.ndarray  # (H, W) int32: 0, or k for the k-th instance (1-based)
    instance_classes: tuple[int, ...]  # class id of instance k at position k - 1


@dataclass(frozen=True)
class Split:
    """Where a written split's parts are (URIs), and what it holds."""

    root: str
    images: str  # folder: the scenes and the broken files
    labels: str  # folder: the label maps
    instances: str  # the COCO instances JSON
    num_images: int  # scenes, large ones included
    num_broken: int
    geotiff: str | None = None  # folder: the GeoTIFF tiles, if any were written


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def render_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    """One aerial-style scene of ``width`` x ``height`` pixels drawn from ``rng``."""
    canvas = _Canvas(rng, width, height)
    canvas.ground()
    canvas.vegetation_fields()
    canvas.water()
    canvas.trees()
    roads = canvas.roads()
    canvas.buildings()
    canvas.cars(roads)
    return canvas.finish()


class _Canvas:
    """A scene being painted: colours, class ids and instance ids, layer over layer."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng = rng
        self.width, self.height = width, height
        # Object counts are per 512 x 512 pixels, up to a cap that keeps a large scene within
        # COCO's 100 evaluated detections per image and class.
        self.scale = min(width * height / 512**2, 2.5)
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.labels = np.full((height, width), GROUND, np.uint8)
        self.instances = np.zeros((height, width), np.int32)
        self.instance_classes: list[int] = []
        self.shadow = np.zeros((height, width), bool)
        sun = rng.uniform(0, 2 * math.pi)
        self.sun = np.array([math.cos(sun), math.sin(sun)])  # direction shadows fall in
        # Built-up areas follow a street grid: most buildings share its orientation.
        self.grid_angle = rng.uniform(0, math.pi / 2)

    def count(self, low: float, high: float, *, lengthwise: bool = False) -> int:
        """A random count in [low, high] per 512 x 512 pixels; ``lengthwise`` for things along
        a line across the scene (roads, the cars along one), which scale with its side."""
        scale = math.sqrt(self.scale) if lengthwise else self.scale
        return int(self.rng.integers(round(low * scale), round(high * scale) + 1))

    def noise(self, cell: int) -> np.ndarray:
        """Smooth value noise, about [0, 1], with features about ``cell`` pixels across."""
        grid_h, grid_w = self.height // cell + 3, self.width // cell + 3
        grid = Image.fromarray(self.rng.random((grid_h, grid_w), dtype=np.float32))
        smooth = np.asarray(grid.resize((grid_w * cell, grid_h * cell), Image.Resampling.BICUBIC))
        top, left = self.rng.integers(0, cell, 2)
        return smooth[top : top + self.height, left : left + self.width]

    def texture(self, base, cells: tuple[int, ...], contrast: float) -> np.ndarray:
        """``base`` colour modulated by a sum of noises of the given feature sizes."""
        field = sum(self.noise(cell) for cell in cells) / len(cells)
        colour = np.asarray(base, np.float32) * self.rng.uniform(0.9, 1.1, 3).astype(np.float32)
        return colour * (1 - contrast / 2 + contrast * field)[..., None]

    def paint(self, mask: np.ndarray, colour: np.ndarray, label: int) -> None:
        self.rgb[mask] = colour[mask]
        self.labels[mask] = label

    def polygon(self, points: np.ndarray, outline: int = 0) -> np.ndarray:
        """Pixels of a polygon (x, y points), grown by ``outline`` // 2 pixels if given."""
        image = Image.new("1", (self.width, self.height))
        xy = [tuple(point) for point in points.tolist()]
        ImageDraw.Draw(image).polygon(xy, fill=1, outline=1 if outline else None, width=outline)
        return np.asarray(image)

    def blob(self, centre, radius: float, roughness: float) -> np.ndarray:
        """An organic shape: a circle whose radius wanders with the angle."""
        angles = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        wander = sum(
            self.rng.uniform(-1, 1) / k * np.cos(k * angles + self.rng.uniform(0, 2 * math.pi))
            for k in range(2, 7)
        )
        radii = radius * np.clip(1 + roughness * wander, 0.3, None)
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        return self.polygon(points + np.asarray(centre))

    def random_point(self) -> np.ndarray:
        return self.rng.uniform(0, 1, 2) * (self.width, self.height)

    def ground(self) -> None:
        base = self.rng.choice([[158, 134, 96], [170, 150, 112], [140, 124, 92], [150, 140, 104]])
        self.rgb[:] = self.texture(base, (96, 24, 6), 0.45)

    def vegetation_fields(self) -> None:
        for _ in range(self.count(0, 3)):
            field = self.blob(self.random_point(), self.rng.uniform(30, 110), 0.8)
            green = self.rng.choice([[70, 110, 50], [56, 96, 44], [90, 120, 60]])
            self.paint(field, self.texture(green, (12, 3), 0.7), VEGETATION)

    def water(self) -> None:
        for _ in range(self.count(0, 1.4)):
            lake = self.blob(self.random_point(), self.rng.uniform(35, 120), 0.6)
            blue = self.rng.choice([[34, 62, 88], [40, 74, 92], [28, 54, 70]])
            self.paint(lake, self.texture(blue, (40, 8), 0.25), WATER)

    def trees(self) -> None:
        canopy = self.texture([62, 100, 46], (3,), 0.8)
        ys, xs = np.mgrid[0 : self.height, 0 : self.width]
        for _ in range(self.count(1, 5)):
            centre = self.random_point()
            for _ in range(int(self.rng.integers(3, 16))):
                x, y = centre + self.rng.normal(0, 24, 2)
                radius = self.rng.uniform(4, 11)
                box = _window(x, y, radius + 1, self.width, self.height)
                dx, dy = xs[box] - x, ys[box] - y
                crown = (dx**2 + dy**2 <= radius**2) & (self.labels[box] != WATER)
                # Lit on the side facing the sun, darker on the far side.
                lit = 1.0 - 0.35 * (dx * self.sun[0] + dy * self.sun[1]) / radius
                self.rgb[box][crown] = canopy[box][crown] * lit[crown, None]
                self.labels[box][crown] = VEGETATION

    def roads(self) -> list[tuple[np.ndarray, float]]:
        """Paint the roads; returns each road's centre line (x, y points) and width."""
        roads = []
        diagonal = math.hypot(self.width, self.height)
        for _ in range(max(1, self.count(1, 3, lengthwise=True))):
            width = float(self.rng.uniform(14, 26))
            if self.rng.random() < 0.5:  # straight, across the whole scene
                direction = _unit(self.rng.uniform(0, math.pi))
                centre = self.random_point()
                line = centre + np.linspace(-diagonal, diagonal, 64)[:, None] * direction
            else:  # a quadratic Bézier curve from outside one side to outside another
                start, control, end = (
                    self.random_point(),
                    self.random_point(),
                    self.random_point(),
                )
                start = start + _unit(self.rng.uniform(0, 2 * math.pi)) * diagonal
                end = end + _unit(self.rng.uniform(0, 2 * math.pi)) * diagonal
                t = np.linspace(0, 1, 128)[:, None]
                line = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
            mask_image = Image.new("1", (self.width, self.height))
            xy = [tuple(point) for point in line.tolist()]
            ImageDraw.Draw(mask_image).line(xy, fill=1, width=round(width), joint="curve")
            asphalt = self.texture([self.rng.uniform(92, 140)] * 3, (6, 2), 0.2)
            self.paint(np.asarray(mask_image), asphalt, ROAD)
            if width >= 18:
                self.centre_dashes(line)
            roads.append((line, width))
        return roads

    def centre_dashes(self, line: np.ndarray) -> None:
        dashes = Image.new("1", (self.width, self.height))
        draw = ImageDraw.Draw(dashes)
        for a, b in _dash_segments(line, dash=10.0, gap=10.0):
            draw.line([tuple(a), tuple(b)], fill=1, width=2)
        on_road = np.asarray(dashes) & (self.labels == ROAD)
        self.rgb[on_road] = (220, 218, 200)

    def buildings(self) -> None:
        blocked = (self.labels == ROAD) | (self.labels == WATER)
        self.grain = self.noise(4)
        for _ in range(self.count(25, 60)):
            size = self.rng.uniform(22, 72, 2)
            if self.rng.random() < 0.75:
                angle = self.grid_angle + self.rng.choice([0, math.pi / 2])
            else:
                angle = self.rng.uniform(0, math.pi)
            l_shaped = self.rng.random() < 0.3
            outline = _l_shape(size, self.rng) if l_shaped else _rectangle(size)
            centre = self.random_point()
            points = _rotated(outline, angle) + centre
            footprint = self.polygon(points)
            # A margin around it keeps buildings off roads, water and each other.
            if footprint.sum() < 150 or (self.polygon(points, outline=9) & blocked).any():
                continue
            self.roof(footprint, centre, angle, size, gable=not l_shaped)
            self.add_instance(footprint, BUILDING)
            blocked |= footprint
            self.cast_shadow(points, footprint, self.rng.uniform(4, 14))

    def roof(self, footprint, centre, angle, size, *, gable: bool) -> None:
        ys, xs = np.nonzero(footprint)
        colour = self.rng.choice(_ROOF_COLOURS) * self.rng.uniform(0.9, 1.1, 3)
        shade = 0.94 + 0.12 * self.grain[ys, xs]
        if gable:
            # The ridge runs along the long side; one slope faces the sun, one faces away.
            ridge = angle if size[0] >= size[1] else angle + math.pi / 2
            normal = _unit(ridge + math.pi / 2)
            side = (xs - centre[0]) * normal[0] + (ys - centre[1]) * normal[1]
            shade *= np.where(side * (normal @ self.sun) < 0, 1.15, 0.75)
        else:  # flat: a darker parapet round the edge
            shade *= np.where(_eroded(footprint, 2)[ys, xs], 1.0, 0.8)
        self.rgb[ys, xs] = colour * shade[:, None]
        self.labels[ys, xs] = BUILDING

    def cast_shadow(self, points: np.ndarray, footprint: np.ndarray, length: float) -> None:
        for t in np.linspace(0.25, 1, 4):
            self.shadow |= self.polygon(points + t * length * self.sun)
        self.shadow &= ~footprint

    def cars(self, roads: list[tuple[np.ndarray, float]]) -> None:
        for line, road_width in roads:
            # Places along the centre line, a few pixels apart, inside the scene.
            steps = np.linspace(0, 1, 4)[:-1, None]
            places = np.concatenate([a + steps * (b - a) for a, b in itertools.pairwise(line)])
            headings = np.repeat(np.arctan2(*np.diff(line, axis=0).T[::-1]), len(steps))
            inside = np.all((places >= 0) & (places < (self.width, self.height)), axis=1)
            if not inside.any():
                continue
            places, headings = places[inside], headings[inside]
            for _ in range(self.count(4, 14, lengthwise=True)):
                i = int(self.rng.integers(len(places)))
                size = np.array([self.rng.uniform(16, 22), self.rng.uniform(8, 10)])
                # Two lanes where the road is wide enough, else the middle.
                lane = max(0.0, road_width / 2 - size[1] / 2 - 2) * self.rng.choice([-1, 1])
                centre = places[i] + lane * _unit(headings[i] + math.pi / 2)
                heading = headings[i] + self.rng.choice([0, math.pi])
                points = _rotated(_rectangle(size), heading) + centre
                body = self.polygon(points)
                clearance = self.polygon(points, outline=5)
                if (
                    body.sum() < 40
                    or (body & (self.labels != ROAD)).any()
                    or (clearance & (self.instances > 0)).any()
                ):
                    continue
                self.paint_car(body, centre, heading, size)
                self.add_instance(body, CAR)
                self.shadow |= self.polygon(points + 3 * self.sun) & ~body

    def paint_car(self, body: np.ndarray, centre, heading: float, size: np.ndarray) -> None:
        ys, xs = np.nonzero(body)
        forward = _unit(heading)
        # Position along the car, -1 at the back to +1 at the front.
        u = ((xs - centre[0]) * forward[0] + (ys - centre[1]) * forward[1]) / (size[0] / 2)
        colour = self.rng.choice(_CAR_COLOURS) * self.rng.uniform(0.9, 1.1)
        shading = np.ones(len(xs), np.float32)
        glass = ((u > 0.2) & (u < 0.5)) | ((u > -0.75) & (u < -0.55))
        shading[glass] = 0.3
        self.rgb[ys, xs] = np.clip(colour * shading[:, None] + 15 * glass[:, None], 0, 255)
        self.labels[ys, xs] = CAR

    def add_instance(self, mask: np.ndarray, label: int) -> None:
        self.instance_classes.append(label)
        self.instances[mask] = len(self.instance_classes)

    def finish(self) -> Scene:
        things = np.isin(self.labels, THINGS)
        self.rgb[self.shadow & ~things] *= _SHADOW
        self.rgb *= (0.9 + 0.2 * self.noise(160))[..., None]  # uneven light and haze
        self.rgb += self.rng.normal(0, 3, self.rgb.shape).astype(np.float32)
        image = Image.fromarray(np.clip(self.rgb, 0, 255).astype(np.uint8))
        # Optics: edges are soft in the picture, exact in the labels.
        image = image.filter(ImageFilter.GaussianBlur(0.6))
        return Scene(np.asarray(image), self.labels, self.instances, tuple(self.instance_classes))


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _rectangle(size) -> np.ndarray:
    half_w, half_h = np.asarray(size) / 2
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


def _l_shape(size, rng: np.random.Generator) -> np.ndarray:
    half_w, half_h = np.asarray(size) / 2
    notch_w, notch_h = rng.uniform(0.35, 0.6, 2) * size
    return np.array(
        [
            [-half_w, -half_h],
            [half_w, -half_h],
            [half_w, half_h - notch_h],
            [half_w - notch_w, half_h - notch_h],
            [half_w - notch_w, half_h],
            [-half_w, half_h],
        ]
    )


def _rotated(points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return points @ np.array([[cos, sin], [-sin, cos]])


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (4-neighbourhood); outside the image counts as out."""
    inner = mask.copy()
    for _ in range(steps):
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner


def _window(x: float, y: float, radius: float, width: int, height: int) -> tuple[slice, slice]:
    return (
        slice(max(0, int(y - radius)), max(0, min(height, int(y + radius) + 1))),
        slice(max(0, int(x - radius)), max(0, min(width, int(x + radius) + 1))),
    )


def _dash_segments(line: np.ndarray, *, dash: float, gap: float):
    """(start, end) points of the dashes of a dashed line along the polyline ``line``."""
    distance = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(line, axis=0).T))])
    for start in np.arange(0.0, distance[-1] - dash, dash + gap):
        yield (
            np.array([np.interp(start, distance, line[:, k]) for k in (0, 1)]),
            np.array([np.interp(start + dash, distance, line[:, k]) for k in (0, 1)]),
        )


# --------------------------------------------------------------------------------------------
# Files.


def encode_jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def encode_label_png(labels: np.ndarray) -> bytes:
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(
        [value for class_id in range(len(CLASSES)) for value in _LABEL_COLOURS[class_id]]
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def encode_geotiff(image: np.ndarray, tile: int, tiles: int) -> bytes:
    """Scene ``image`` as tile ``tile`` of a mosaic of ``tiles`` (see the module notes)."""
    import rasterio
    from affine import Affine
    from rasterio.io import MemoryFile

    height, width = image.shape[:2]
    row, column = divmod(tile, GEO_COLUMNS)
    pixels = np.maximum(image, 1).transpose(2, 0, 1)  # 0 is nodata
    if column == GEO_COLUMNS - 1 or tile == tiles - 1:
        pixels[:, :, width - NODATA_MARGIN :] = 0
    if row == (tiles - 1) // GEO_COLUMNS:
        pixels[:, height - NODATA_MARGIN :, :] = 0
    west = GEO_ORIGIN[0] + column * width * GEO_PIXEL
    north = GEO_ORIGIN[1] - row * height * GEO_PIXEL
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": rasterio.crs.CRS.from_string(GEO_CRS),
        "transform": Affine(GEO_PIXEL, 0.0, west, 0.0, -GEO_PIXEL, north),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB",
    }
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(pixels)
        return bytes(memory.getbuffer())


def coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict]:
    """The scene's instances as COCO annotations (compressed RLE, iscrowd 0), ids from
    ``first_id`` on."""
    instance_ids, measured = rle.encode_label_map_measured(scene.instances)
    annotations = []
    for instance, mask, area, box in zip(
        instance_ids.tolist(), measured.rles, measured.areas, measured.boxes, strict=True
    ):
        if instance == 0:
            continue
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": THINGS.index(scene.instance_classes[instance - 1]) + 1,
                "segmentation": {"size": mask["size"], "counts": mask["counts"].decode("ascii")},
                "area": int(area),
                "bbox": [float(v) for v in box],
                "iscrowd": 0,
            }
        )
    return annotations


def broken_file(kind: str, rng: np.random.Generator) -> tuple[str, bytes]:
    """(file suffix, bytes) of a file that pretends to be an image."""
    if kind == "truncated":
        whole = encode_jpeg(render_scene(rng, 256, 256).image)
        return "truncated.jpg", whole[: len(whole) // 2]
    if kind == "empty":
        return "empty.jpg", b""
    return "text.png", b"this is a text file, not a PNG image\n"


def write_corpus(
    uri: str,
    *,
    split: str = "train",
    images: int = 40,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    large: int = 0,
    large_size: tuple[int, int] = DEFAULT_LARGE_SIZE,
    broken: int = 0,
    geotiff: int = 0,
) -> Split:
    """Write split ``split`` under ``uri`` (any fsspec URI: a folder, ``s3://bucket/prefix``):
    ``images`` scenes of ``size`` (width, height), then ``large`` of ``large_size``, and
    ``broken`` broken files; the first ``geotiff`` scenes also as GeoTIFF tiles. See the
    module notes for the layout."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    counts = {"images": images, "large": large, "broken": broken, "seed": seed, "geotiff": geotiff}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if geotiff > images:
        raise ValueError(f"geotiff must be at most images ({images}), got {geotiff}")
    for name, value in (("size", size), ("large_size", large_size)):
        if len(value) != 2 or not all(isinstance(v, int) and v >= MIN_SIZE for v in value):
            raise ValueError(f"{name} must be (width, height), each >= {MIN_SIZE}, got {value!r}")
    fs, root = fsspec.core.url_to_fs(uri)
    root = f"{root.rstrip('/')}/{split}"
    for folder in ("images", "labels", "geotiff")[: 3 if geotiff else 2]:
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
    coco: dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i + 1, "name": CLASSES[thing], "supercategory": "object"}
            for i, thing in enumerate(THINGS)
        ],
    }
    sizes = [size] * images + [large_size] * large
    for index, (width, height) in enumerate(sizes):
        scene = render_scene(scene_rng(seed, split, index), width, height)
        stem = f"{split}-{index:05d}"
        fs.pipe_file(f"{root}/images/{stem}.jpg", encode_jpeg(scene.image))
        fs.pipe_file(f"{root}/labels/{stem}.png", encode_label_png(scene.labels))
        if index < geotiff:
            fs.pipe_file(f"{root}/geotiff/{stem}.tif", encode_geotiff(scene.image, index, geotiff))
        image_id = index + 1
        coco["images"].append(
            {"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height}
        )
        coco["annotations"] += coco_annotations(scene, image_id, len(coco["annotations"]) + 1)
    for k in range(broken):
        kind = BROKEN_KINDS[k % len(BROKEN_KINDS)]
        suffix, data = broken_file(kind, scene_rng(seed, split, len(sizes) + k))
        fs.pipe_file(f"{root}/images/{split}-broken-{k}-{suffix}", data)
    fs.pipe_file(f"{root}/instances.json", json.dumps(coco).encode())
    parameters = {
        "generator": "segflow.demo.corpus",
        "split": split,
        "seed": seed,
        "images": images,
        "size": list(size),
        "large": large,
        "large_size": list(large_size),
        "broken": broken,
        "geotiff": geotiff,
        "classes": list(CLASSES),
    }
    fs.pipe_file(f"{root}/corpus.json", json.dumps(parameters, indent=2).encode())
    location = f"{uri.rstrip('/')}/{split}"
    return Split(
        root=location,
        images=f"{location}/images",
        labels=f"{location}/labels",
        instances=f"{location}/instances.json",
        num_images=len(sizes),
        num_broken=broken,
        geotiff=f"{location}/geotiff" if geotiff else None,
    )


def _size(text: str) -> tuple[int, int]:
    width, x, height = text.partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 512x512, got {text!r}")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segflow.demo.corpus",
        description="Write a split of the synthetic aerial corpus to a folder or s3:// prefix.",
    )
    parser.add_argument("uri", help="where to write (the split goes in URI/SPLIT)")
    parser.add_argument("--split", choices=list(SPLITS), default="train")
    parser.add_argument("--images", type=int, default=40, help="scenes of --size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_size, default=DEFAULT_SIZE, help="WIDTHxHEIGHT")
    parser.add_argument("--large", type=int, default=0, help="more scenes of --large-size")
    parser.add_argument("--large-size", type=_size, default=DEFAULT_LARGE_SIZE)
    parser.add_argument("--broken", type=int, default=0, help="broken files to add")
    parser.add_argument("--geotiff", type=int, default=0, help="first scenes as GeoTIFF tiles")
    args = parser.parse_args(argv)
    try:
        written = write_corpus(
            args.uri,
            split=args.split,
            images=args.images,
            seed=args.seed,
            size=args.size,
            large=args.large,
            large_size=args.large_size,
            broken=args.broken,
            geotiff=args.geotiff,
        )
    except ValueError as error:
        parser.error(str(error))
    print(
        f"{written.num_images} images and {written.num_broken} broken files in {written.images}\n"
        f"label maps: masks:{written.labels}\ninstances:  coco:{written.instances}"
    )


if __name__ == "__main__":
    main()
