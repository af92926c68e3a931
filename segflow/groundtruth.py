"""Ground truth for a run's images, read through fsspec and matched to each image's URI.

A ground-truth spec names a format and a location, ``KIND:URI[?key=value[&key=value]]``; the
options start after the last ``?`` (URIs may hold spaces, and ``:`` after the kind). Kinds:

``coco:FILE``
    A COCO instances JSON; instance targets. An image URI matches the JSON image whose
    ``file_name`` has the URI's basename, else (a re-encoded copy) the same stem.
``masks:DIR``
    Index PNG label maps (VOC, CamVid, Cityscapes) anywhere under DIR, found by one listing
    when the spec is opened; semantic targets. An image's *key* is its file name less
    ``image_suffix`` (default: its extension, so its stem); a label file's key is its name less
    ``suffix`` (default ``.png``, any case), and only files ending with it are label files. An
    image matches the label file of its key; where several share it (``Tile 1/masks/x.png``
    and ``Tile 2/masks/x.png``), the one whose folders share the most names with the image's
    folders. Cityscapes' parallel trees (``leftImg8bit/val/bonn/X_leftImg8bit.png``,
    ``gtFine/val/bonn/X_gtFine_labelIds.png``) match with
    ``?image_suffix=_leftImg8bit.png&suffix=_gtFine_labelIds.png``. Options: ``id_map=URI``, a
    JSON object ``{"stored id": class id, or null to ignore}`` (unmapped ids are ignored), or
    ``id_map=cityscapes``, Cityscapes' label ids to its 19 train ids
    (:data:`segflow.cityscapes.TRAIN_IDS`); ``palette=URI``, for colour-coded masks (RGB, or
    palette PNGs whose colours are meant): ``{"classes": [{"id", "rgb"}...], "ignore_rgb":
    [[r, g, b]...]}``, where a colour outside the palette is an error. With both, the palette
    applies first. ``instances=SUFFIX`` (with ``id_map=cityscapes``): each image's instance
    file, matched as its label file is but ending with SUFFIX (``_gtFine_instanceIds.png``);
    a value ``v > 1000`` there is an instance of label id ``v // 1000`` (Cityscapes' encoding),
    kept where that label is an evaluated class: the target's ``instances``, for iIoU.
``coco-semantic:FILE?categories=voc``
    Semantic targets from COCO instances, as torchvision's segmentation reference builds
    them (``references/segmentation/coco_utils.py``): only the listed categories, each pixel
    the largest class id of the instances covering it, background 0, pixels under more than
    one instance ignored. ``categories=voc`` is the reference's 21 VOC classes;
    ``categories=URI`` a JSON object ``{"coco category id": class id}``.
``vector:FILE?class=NAME`` or ``vector:FILE?class_field=PROPERTY`` (``&background=NAME``)
    Polygons (GeoJSON, GeoPackage or GeoParquet; the first layer of a file that has several),
    rasterized onto each georeferenced raster's grid as GDAL rasterizes them: a pixel is
    inside a polygon when its centre is (``all_touched=False``). An image that is not a
    georeferenced raster has no vector ground truth. ``class=NAME`` gives every polygon the
    class NAME; ``class_field=PROPERTY`` gives each the class its property names. Class names
    are the model's, matched exactly (as COCO categories are); a name the model does not have,
    a missing property, a feature without a value, or a geometry that is not a (multi)polygon
    is an error when the spec is opened, before any work. Null and empty geometries are
    skipped. The vector file is read once, when the spec is opened; for each raster only the
    polygons that meet its footprint are reprojected, into the raster's CRS, and rasterized.
    The file's CRS is the one it names; one that names none (a GeoPackage or GeoParquet
    without a CRS, or a GeoJSON whose coordinates cannot be longitude and latitude although
    GeoJSON without a ``crs`` member is WGS 84 by RFC 7946) is taken to be in the raster's.

    Semantic models: where polygons overlap, the later feature in the file wins (GDAL's
    order). Pixels outside every polygon are background: the class ``?background=NAME``
    names, else the model's class named ``background`` or ``__background__`` if it has one.
    A model with neither (CamVid's classes, say) has no class for them: they are *unlabelled*,
    ground truth of no class, but a prediction of an evaluated class there is a false
    positive. Only the classes the file labels (and the background) are evaluated: the
    figures of the others are undefined, since the file says nothing of them, and the means
    are over the evaluated classes. So ``vector:buildings.geojson?class=building`` with a
    CamVid model gives building's IoU, ``|predicted ∩ polygons| / |predicted ∪ polygons|``
    over the raster's valid pixels, and pixel accuracy is the share of building pixels found.

    Instance models: one ground-truth object per polygon that covers a pixel centre, its
    mask the polygon's pixels (an RLE, with its area and box), its COCO category id the
    model's class id; ``segflow evaluate`` gives COCO mAP. Invalid (nodata) pixels are in no
    object.

``ignore_index``, for semantic kinds, is a class id whose pixels are ignored; it applies to
the ids a target holds (after id_map, palette or categories), the ids a model predicts.
A georeferenced raster's invalid (nodata) pixels are ignored whatever the kind.
"""

from __future__ import annotations

import io
import json
import posixpath
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Container, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import fsspec
import numpy as np
from PIL import Image

from segflow import cityscapes, rle
from segflow.decode import ImageDecodeError, UnsupportedModeError, decode_label_map, decode_rgb
from segflow.errors import SegflowError
from segflow.reading import read_bytes

__all__ = [
    "IGNORE",
    "UNLABELLED",
    "VOC_CATEGORIES",
    "CocoDataset",
    "GroundTruth",
    "GroundTruthError",
    "InstanceTarget",
    "Instances",
    "ModelClasses",
    "RasterGrid",
    "SemanticTarget",
    "coco_image_id",
    "open_ground_truth",
    "read_coco",
    "read_json",
    "within_valid",
]

IGNORE = -1
# A pixel evaluated but ground truth of no class (vector ground truth without a background):
# a prediction of an evaluated class there is a false positive.
UNLABELLED = -2

# torchvision's CAT_LIST: the COCO category of each VOC class, by class id (0: background,
# which no COCO category has).
VOC_CATEGORIES = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)


class GroundTruthError(SegflowError, ValueError):
    """Ground truth that cannot be used; the message names the spec or file, and the image."""


@dataclass(frozen=True)
class Instances:
    """The ground-truth instances of an image's evaluated classes."""

    ids: np.ndarray  # (H, W) int64: an instance's pixels share an id > 0; 0 outside them
    classes: Mapping[int, int]  # instance id -> its class id


@dataclass(frozen=True)
class SemanticTarget:
    # (H, W) int64 class ids, IGNORE where the pixel is not evaluated, UNLABELLED where it is
    # but is no class's
    labels: np.ndarray
    source: str  # URI of the ground-truth file used
    instances: Instances | None = None  # with an instances= option
    classes: frozenset[int] | None = None  # the classes evaluated (None: every class)


@dataclass(frozen=True)
class InstanceTarget:
    height: int
    width: int
    annotations: list[dict]  # the image's COCO annotation dicts, as in the JSON
    source: str  # "FILE#image_id=ID"


@dataclass(frozen=True)
class ModelClasses:
    """What ground truth that names classes (``vector:``) needs of the model it scores."""

    task: Literal["semantic", "instance"]
    classes: tuple[str, ...]

    @classmethod
    def of(cls, model: Any) -> ModelClasses:
        """Those of a loaded model (a :class:`segflow.models.SegmentationModel`)."""
        return cls(model.task, tuple(model.classes))


@dataclass(frozen=True)
class RasterGrid:
    """A georeferenced raster's pixel grid, which vector ground truth is rasterized onto."""

    height: int
    width: int
    crs: str | None  # EPSG:n or WKT2 (segflow.raster.Georeference)
    transform: tuple[float, float, float, float, float, float] | None  # rasterio's a..f
    valid: np.ndarray | None = None  # (H, W) bool: GDAL's dataset mask; None: every pixel


class GroundTruth(ABC):
    """Opened ground truth: ``target(uri)`` gives the target of one image."""

    kind: Literal["semantic", "instance"]  # the adapter's, or (vector:) the model's task
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: str) -> None:
        self.spec = spec
        # COCO category id -> name, for instance ground truth.
        self.categories: dict[int, str] | None = None

    @abstractmethod
    def target(self, uri: str, grid: RasterGrid | None = None) -> SemanticTarget | InstanceTarget:
        """The target of the image at ``uri`` (``grid``: its raster's grid, where it is a
        georeferenced raster); GroundTruthError when it has none, more than one, or one
        that cannot be read."""

    def label_values(self) -> Container[int]:
        """The class ids a semantic target can hold before ``ignore_index`` applies (what
        an ignore index may name): the mapped ids of an id map, palette or category table,
        else what the label files' bit depth can store."""
        return range(0)


def open_ground_truth(
    spec: str, *, ignore_index: int | None = None, model: ModelClasses | None = None
) -> GroundTruth:
    """Open a ground-truth spec (see the module notes), reading and checking what every image
    needs (the COCO file, the label file listing, the id map or palette, the vector file)
    before any work. ``model``: the task and classes of the model it scores, which
    ``vector:`` ground truth needs (its class names are the model's)."""
    if not isinstance(spec, str):
        raise GroundTruthError(f"ground truth spec must be a string, got {type(spec).__name__}")
    kind, location, options = _parse_spec(spec)
    adapter = _ADAPTERS[kind]
    unknown = sorted(options.keys() - adapter.options)
    if unknown:
        allowed = ", ".join(sorted(adapter.options)) or "none"
        raise GroundTruthError(
            f"ground truth {spec!r}: unknown option(s) {unknown} for {kind!r} (allowed: {allowed})"
        )
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer)
    ):
        raise GroundTruthError(
            f"ground truth {spec!r}: ignore_index must be an integer, got {ignore_index!r}"
        )
    ground_truth = adapter(
        spec, location, options, None if ignore_index is None else int(ignore_index), model
    )
    if ignore_index is not None and ground_truth.kind != "semantic":
        raise GroundTruthError(
            f"ground truth {spec!r}: ignore_index applies to semantic ground truth only, "
            f"and {kind!r} is {ground_truth.kind} here"
        )
    return ground_truth


def within_valid(
    target: SemanticTarget | InstanceTarget, valid: np.ndarray | None
) -> SemanticTarget | InstanceTarget:
    """``target`` with a raster's invalid pixels (``~valid``) ignored: they have no class and
    are in no metric. Instance targets are left as they are (``vector:`` leaves invalid
    pixels out of its objects itself)."""
    if (
        valid is None
        or not isinstance(target, SemanticTarget)
        or valid.shape != target.labels.shape
    ):
        return target  # a size mismatch is the scorer's to report
    return replace(target, labels=np.where(valid, target.labels, IGNORE))


def _parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in _ADAPTERS:
        raise GroundTruthError(
            f"ground truth {spec!r} must be KIND:URI[?options] with KIND one of "
            f"{', '.join(_ADAPTERS)}"
        )
    location, question_mark, query = rest.rpartition("?")
    if not question_mark:
        location, query = rest, ""
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, equals, value = item.partition("=")
        if not (equals and key and value):
            raise GroundTruthError(f"ground truth {spec!r}: option {item!r} is not key=value")
        if key in options:
            raise GroundTruthError(f"ground truth {spec!r}: option {key!r} is given twice")
        options[key] = value
    if not location:
        raise GroundTruthError(f"ground truth {spec!r} names no file or folder")
    return kind, location, options


# --------------------------------------------------------------------------------------------
# Reading through fsspec.


def _read_bytes(uri: str, what: str, error: type[ValueError] = GroundTruthError) -> bytes:
    """The bytes at ``uri``; ``error`` naming ``what`` when they cannot be had."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise error(f"{what} does not exist") from None
    except Exception as failure:
        # Each fsspec backend raises its own types (botocore's, aiohttp's, ...): whatever the
        # type, the user needs to know which file failed and why.
        raise error(f"{what} cannot be read: {type(failure).__name__}: {failure}") from failure


def read_json(uri: str, what: str, error: type[ValueError] = GroundTruthError) -> Any:
    """The JSON document at ``uri``; ``error`` (naming ``what`` and the URI) when it is missing,
    unreadable or not JSON."""
    label = f"{what} {uri!r}"
    data = _read_bytes(uri, label, error)
    try:
        return json.loads(data)
    except ValueError as failure:  # JSONDecodeError and UnicodeDecodeError
        raise error(f"{label} is not valid JSON: {failure}") from None


def _uri_path(uri: str) -> str:
    """The URI's path as its filesystem lists paths (no protocol; local paths absolute)."""
    try:
        return fsspec.core.strip_protocol(uri)
    except Exception as error:  # an unknown protocol
        raise GroundTruthError(f"image URI {uri!r}: {type(error).__name__}: {error}") from error


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GroundTruthError(f"{what} must be an integer, got {value!r:.80}")
    return value


def _class_id(value: Any, what: str) -> int:
    if _integer(value, what) < 0:
        raise GroundTruthError(f"{what} must be a class id >= 0, got {value}")
    return value


def _id_table(uri: str, what: str, *, null_means_ignore: bool) -> dict[int, int]:
    """A JSON object {"id": class id (or null: IGNORE)} read from ``uri``; ids are >= 0."""
    table = read_json(uri, what)
    label = f"{what} {uri!r}"
    if not isinstance(table, dict) or not table:
        raise GroundTruthError(f"{label} must be a non-empty JSON object {{id: class id}}")
    result = {}
    for key, value in table.items():
        try:
            source = int(key)
        except ValueError:
            source = -1
        if source < 0:
            raise GroundTruthError(f"{label}: key {key!r} is not an id >= 0")
        if value is None and null_means_ignore:
            result[source] = IGNORE
        else:
            result[source] = _class_id(value, f"{label}[{key!r}]")
    return result


# --------------------------------------------------------------------------------------------
# COCO instances.


@dataclass(frozen=True)
class CocoDataset:
    """A checked COCO instances JSON."""

    uri: str
    images: dict[int, dict]  # image id -> its entry (id, file_name, height, width, ...)
    annotations: dict[int, list[dict]]  # image id -> its annotations, in file order
    categories: dict[int, str]  # category id -> name


def read_coco(uri: str) -> CocoDataset:
    """Read a COCO instances JSON, checking the fields that ground truth relies on."""
    dataset = read_json(uri, "COCO annotations")
    label = f"COCO annotations {uri!r}"
    if not isinstance(dataset, dict):
        raise GroundTruthError(f"{label} must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise GroundTruthError(f"{label} has no {key!r} list")

    images: dict[int, dict] = {}
    for i, image in enumerate(dataset["images"]):
        what = f"{label}: images[{i}]"
        if not isinstance(image, dict):
            raise GroundTruthError(f"{what} is not an object")
        image_id = _integer(image.get("id"), f"{what}['id']")
        if not isinstance(image.get("file_name"), str):
            raise GroundTruthError(f"{what} has no 'file_name' string")
        for side in ("height", "width"):
            if _integer(image.get(side), f"{what}[{side!r}]") <= 0:
                raise GroundTruthError(f"{what}[{side!r}] must be positive")
        if image_id in images:
            raise GroundTruthError(f"{label}: image id {image_id} is listed twice")
        images[image_id] = image

    annotations: dict[int, list[dict]] = defaultdict(list)
    for i, annotation in enumerate(dataset["annotations"]):
        what = f"{label}: annotations[{i}]"
        if not isinstance(annotation, dict):
            raise GroundTruthError(f"{what} is not an object")
        _integer(annotation.get("category_id"), f"{what}['category_id']")
        annotations[_integer(annotation.get("image_id"), f"{what}['image_id']")].append(annotation)

    categories: dict[int, str] = {}
    for i, category in enumerate(dataset["categories"]):
        what = f"{label}: categories[{i}]"
        if not isinstance(category, dict) or not isinstance(category.get("name"), str):
            raise GroundTruthError(f"{what} must be an object with a 'name' string")
        category_id = _integer(category.get("id"), f"{what}['id']")
        if category_id in categories:
            raise GroundTruthError(f"{label}: category id {category_id} is listed twice")
        categories[category_id] = category["name"]
    return CocoDataset(uri, images, dict(annotations), categories)


class _CocoImages(GroundTruth):
    """A COCO JSON whose images are matched to URIs by file name."""

    def __init__(self, spec: str, location: str) -> None:
        super().__init__(spec)
        self.dataset = read_coco(location)
        self._by_name: dict[str, list[int]] = defaultdict(list)
        self._by_stem: dict[str, list[int]] = defaultdict(list)
        for image_id, image in self.dataset.images.items():
            self._by_name[posixpath.basename(image["file_name"])].append(image_id)
            self._by_stem[_stem(image["file_name"])].append(image_id)

    def _image(self, uri: str) -> dict:
        name = posixpath.basename(_uri_path(uri))
        found = self._by_name.get(name) or self._by_stem.get(_stem(name), [])
        if len(found) != 1:
            problem = "no image" if not found else f"{len(found)} images (ids {sorted(found)})"
            raise GroundTruthError(
                f"ground truth for {uri!r}: {self.dataset.uri!r} has {problem} with file name "
                f"{name!r} or stem {_stem(name)!r}"
            )
        return self.dataset.images[found[0]]

    def _source(self, image: dict) -> str:
        return f"{self.dataset.uri}{_IMAGE_ID_MARK}{image['id']}"


_IMAGE_ID_MARK = "#image_id="


def coco_image_id(source: str) -> int:
    """The COCO image id in an :class:`InstanceTarget`'s ``source`` (an ``images`` row's
    ``gt_uri``)."""
    _, mark, image_id = source.rpartition(_IMAGE_ID_MARK)
    if not mark:
        raise GroundTruthError(f"{source!r} does not name a COCO image")
    return int(image_id)


class _CocoInstances(_CocoImages):
    kind = "instance"

    def __init__(
        self, spec: str, location: str, options: dict, ignore_index: int | None, model: Any
    ) -> None:
        super().__init__(spec, location)
        self.categories = dict(self.dataset.categories)

    def target(self, uri: str, grid: RasterGrid | None = None) -> InstanceTarget:
        image = self._image(uri)
        return InstanceTarget(
            height=image["height"],
            width=image["width"],
            annotations=list(self.dataset.annotations.get(image["id"], [])),
            source=self._source(image),
        )


class _CocoSemantic(_CocoImages):
    kind = "semantic"
    options = frozenset({"categories"})

    def __init__(
        self, spec: str, location: str, options: dict, ignore_index: int | None, model: Any
    ) -> None:
        if "categories" not in options:
            raise GroundTruthError(
                f"ground truth {spec!r} needs ?categories=voc or ?categories=URI of a JSON "
                "object {coco category id: class id}"
            )
        if options["categories"] == "voc":
            self._classes = {category: i for i, category in enumerate(VOC_CATEGORIES)}
        else:
            self._classes = _id_table(options["categories"], "categories", null_means_ignore=False)
        super().__init__(spec, location)
        self._ignore_index = ignore_index

    def label_values(self) -> Container[int]:
        return frozenset(self._classes.values())

    def target(self, uri: str, grid: RasterGrid | None = None) -> SemanticTarget:
        image = self._image(uri)
        height, width, source = image["height"], image["width"], self._source(image)
        labels = np.zeros((height, width), np.int64)
        # Crowd annotations are kept: torchvision's segmentation reference does not filter
        # iscrowd (its detection reference does), so crowd regions take their class.
        coverage = np.zeros((height, width), np.int32)
        for annotation in self.dataset.annotations.get(image["id"], []):
            class_id = self._classes.get(annotation["category_id"])
            if class_id is None:
                continue
            mask = annotation_mask(annotation, height, width, f"{uri!r}: {source}")
            np.maximum(labels, np.where(mask, class_id, 0), out=labels)
            coverage += mask
        labels[coverage > 1] = IGNORE
        return SemanticTarget(_ignoring(labels, self._ignore_index), source)


def annotation_mask(annotation: dict, height: int, width: int, where: str) -> np.ndarray:
    """The annotation's pixels (H, W) as uint8, its polygons merged (pycocotools' annToMask)."""
    what = f"ground truth for {where}: annotation {annotation.get('id')!r}"
    if "segmentation" not in annotation:
        raise GroundTruthError(f"{what} has no 'segmentation'")
    try:
        rles = rle.fr_py_objects(annotation["segmentation"], height, width)
        if isinstance(rles, dict):
            return rle.decode(rles)
        if not rles:
            return np.zeros((height, width), np.uint8)
        return rle.decode(rle.merge(rles))
    except rle.RLEError as error:
        raise GroundTruthError(f"{what}: {error}") from None


def _ignoring(labels: np.ndarray, ignore_index: int | None) -> np.ndarray:
    if ignore_index is None:
        return labels
    return np.where(labels == ignore_index, IGNORE, labels)


# --------------------------------------------------------------------------------------------
# Label map files.


@dataclass(frozen=True)
class _Lookup:
    """Integer codes (label values, packed colours) to class ids, applied to whole arrays."""

    codes: np.ndarray  # (N,) int64, sorted, N >= 1
    classes: np.ndarray  # (N,) int64, IGNORE for ignored codes

    @classmethod
    def of(cls, table: Mapping[int, int]) -> _Lookup:
        codes = np.array(sorted(table), np.int64)
        return cls(codes, np.array([table[code] for code in codes.tolist()], np.int64))

    def apply(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The class id of each value (IGNORE where unknown), and where the value is known."""
        position = np.minimum(np.searchsorted(self.codes, values), len(self.codes) - 1)
        known = self.codes[position] == values
        return np.where(known, self.classes[position], IGNORE), known


def _packed(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _read_palette(uri: str) -> _Lookup:
    palette = read_json(uri, "palette")
    label = f"palette {uri!r}"
    if not isinstance(palette, dict) or not isinstance(palette.get("classes"), list):
        raise GroundTruthError(f"{label} must be a JSON object with a 'classes' list")
    ignored = palette.get("ignore_rgb", [])
    if not palette["classes"] or not isinstance(ignored, list):
        raise GroundTruthError(f"{label}: 'classes' must not be empty, 'ignore_rgb' is a list")
    colours: list[tuple[str, Any, int]] = []
    for i, entry in enumerate(palette["classes"]):
        what = f"{label}: classes[{i}]"
        if not isinstance(entry, dict):
            raise GroundTruthError(f"{what} must be an object with 'id' and 'rgb'")
        colours.append((f"{what}['rgb']", entry.get("rgb"), _class_id(entry.get("id"), what)))
    colours += [(f"{label}: ignore_rgb[{i}]", rgb, IGNORE) for i, rgb in enumerate(ignored)]
    table: dict[int, int] = {}
    for what, rgb, class_id in colours:
        if not (
            isinstance(rgb, list)
            and len(rgb) == 3
            and all(type(c) is int and 0 <= c <= 255 for c in rgb)
        ):
            raise GroundTruthError(f"{what} must be [r, g, b] with values 0-255, got {rgb!r:.80}")
        code = int(_packed(np.array(rgb)))
        if code in table:
            raise GroundTruthError(f"{label}: colour {rgb} is listed twice")
        table[code] = class_id
    return _Lookup.of(table)


class _LabelMaps(GroundTruth):
    kind = "semantic"
    options = frozenset({"id_map", "palette", "suffix", "image_suffix", "instances"})

    def __init__(
        self, spec: str, location: str, options: dict, ignore_index: int | None, model: Any
    ) -> None:
        super().__init__(spec)
        self._location = location
        self._ignore_index = ignore_index
        self._palette_uri = options.get("palette")
        self._palette = _read_palette(self._palette_uri) if self._palette_uri else None
        id_map = options.get("id_map")
        self._id_map = (
            None
            if id_map is None
            else _Lookup.of(
                cityscapes.TRAIN_IDS
                if id_map == "cityscapes"
                else _id_table(id_map, "id_map", null_means_ignore=True)
            )
        )
        self._image_suffix = options.get("image_suffix")
        self._instances_suffix = options.get("instances")
        if self._instances_suffix is not None and id_map != "cityscapes":
            raise GroundTruthError(
                f"ground truth {spec!r}: instances= reads Cityscapes instance files, whose "
                "classes are label ids: give id_map=cityscapes too"
            )
        label = f"ground truth folder {location!r}"
        try:
            self._fs, root = fsspec.core.url_to_fs(location)
            if not self._fs.isdir(root):
                problem = "is a file, not a folder" if self._fs.isfile(root) else "does not exist"
                raise GroundTruthError(f"{label} {problem}")
            paths = self._fs.find(root)
        except GroundTruthError:
            raise
        except Exception as error:  # backend-specific, as in _read_bytes
            raise GroundTruthError(
                f"{label} cannot be listed: {type(error).__name__}: {error}"
            ) from error
        self._labels = _Index(paths, options.get("suffix"))
        if not self._labels.files:
            raise GroundTruthError(
                f"{label} holds no label files ending with {self._labels.suffix}"
            )
        self._instances = (
            None if self._instances_suffix is None else _Index(paths, self._instances_suffix)
        )

    def label_values(self) -> Container[int]:
        lookup = self._id_map or self._palette
        if lookup is not None:
            return frozenset(lookup.classes[lookup.classes >= 0].tolist())
        # Label files of one dataset share a bit depth: the first file's header tells it.
        first = self._fs.unstrip_protocol(min(p for ps in self._labels.files.values() for p in ps))
        with self._fs.open(first, "rb") as f:
            mode = Image.open(f).mode
        return range(2**16) if mode.startswith("I") else range(2**8)

    def target(self, uri: str, grid: RasterGrid | None = None) -> SemanticTarget:
        path = self._file(uri, self._labels, "label file")
        source = self._fs.unstrip_protocol(path)
        where = f"ground truth for {uri!r}"
        labels = self._decoded(source, where)
        if self._id_map is not None:
            # Ids are >= 0, so IGNORE pixels (palette ignore colours) stay IGNORE.
            labels, _ = self._id_map.apply(labels)
        instances = None
        if self._instances is not None:
            instances = self._instance_ids(self._file(uri, self._instances, "instance file"), where)
            if instances.ids.shape != labels.shape:
                raise GroundTruthError(
                    f"{where}: instance file is {instances.ids.shape[1]}x{instances.ids.shape[0]}"
                    f" but label file {source!r} is {labels.shape[1]}x{labels.shape[0]}"
                )
        return SemanticTarget(_ignoring(labels, self._ignore_index), source, instances)

    def _instance_ids(self, path: str, where: str) -> Instances:
        source = self._fs.unstrip_protocol(path)
        values = self._decoded(source, where)
        found = np.unique(values[values > 1000])
        classes, _ = self._id_map.apply(found // 1000)
        kept = (classes != IGNORE) & (classes != self._ignore_index)
        found, classes = found[kept], classes[kept]
        ids = np.where(np.isin(values, found), values, 0)
        return Instances(ids, dict(zip(found.tolist(), classes.tolist(), strict=True)))

    def _decoded(self, source: str, where: str) -> np.ndarray:
        data = _read_bytes(source, f"{where}: file {source!r}")
        try:
            if self._palette is None:
                labels = decode_label_map(data, name=source)
            else:
                rgb = decode_rgb(data, name=source)
                labels = self._colours_to_classes(rgb, f"{where}: {source}")
        except UnsupportedModeError as error:
            raise GroundTruthError(
                f"{where}: {error}; give the spec a palette=URI option"
            ) from None
        except ImageDecodeError as error:
            raise GroundTruthError(f"{where}: {error}") from None
        return labels

    def _colours_to_classes(self, rgb: np.ndarray, where: str) -> np.ndarray:
        labels, known = self._palette.apply(_packed(rgb))
        if not known.all():
            unknown = rgb[~known]
            colour = unknown[0].tolist()
            count = int(np.all(unknown == unknown[0], axis=1).sum())
            raise GroundTruthError(
                f"{where}: colour {colour} ({count} pixels) is not in palette {self._palette_uri!r}"
            )
        return labels

    def _file(self, uri: str, index: _Index, what: str) -> str:
        image_path = _uri_path(uri)
        name = posixpath.basename(image_path)
        if self._image_suffix is None:
            key = _stem(name)
        elif name.endswith(self._image_suffix):
            key = name[: -len(self._image_suffix)]
        else:
            raise GroundTruthError(
                f"ground truth for {uri!r}: the image's name does not end with image_suffix "
                f"{self._image_suffix!r}"
            )
        # A PNG image under DIR is listed too, and is not its own label map.
        candidates = [path for path in index.files.get(key, []) if path != image_path]
        if not candidates:
            raise GroundTruthError(
                f"ground truth for {uri!r}: no {what} {key}{index.suffix} under {self._location!r}"
            )
        image_folders = set(posixpath.dirname(image_path).split("/"))
        shared = [
            len(image_folders & set(posixpath.dirname(path).split("/"))) for path in candidates
        ]
        best = [
            path for path, count in zip(candidates, shared, strict=True) if count == max(shared)
        ]
        if len(best) > 1:
            names = ", ".join(repr(self._fs.unstrip_protocol(path)) for path in sorted(best))
            raise GroundTruthError(
                f"ground truth for {uri!r}: {what}s {names} match it equally well (same name, "
                "as many folder names in common)"
            )
        return best[0]


class _Index:
    """The files of a listing ending with ``suffix`` (default ``.png``, any case), by key: the
    name less the suffix."""

    def __init__(self, paths: list[str], suffix: str | None) -> None:
        self.suffix = suffix or ".png"
        self.files: dict[str, list[str]] = defaultdict(list)
        for path in paths:
            name = posixpath.basename(path)
            if (name if suffix else name.lower()).endswith(self.suffix):
                self.files[name[: -len(self.suffix)]].append(path)


# --------------------------------------------------------------------------------------------
# Vector files.

_BACKGROUND_NAMES = ("background", "__background__")
_POLYGONAL = (3, 6)  # shapely's type ids of Polygon and MultiPolygon


@dataclass(frozen=True)
class _Layer:
    """A vector file's features: geometries (shapely, None where null), the class property's
    values, the CRS it names (None: none), its properties."""

    geometries: np.ndarray
    values: list[Any] | None
    crs: Any  # pyproj.CRS | None
    properties: tuple[str, ...]


def _read_layer(data: bytes, label: str, field: str | None) -> _Layer:
    import shapely

    try:
        if data[:4] == b"PAR1":
            layer = _read_geoparquet(data, label, field)
        else:
            layer = _read_ogr(data, field)
    except GroundTruthError:
        raise
    except Exception as error:  # GDAL's, Arrow's and PROJ's own error types
        raise GroundTruthError(
            f"{label} cannot be read as GeoJSON, GeoPackage or GeoParquet: "
            f"{type(error).__name__}: {error}"
        ) from error
    if field is not None and field not in layer.properties:
        raise GroundTruthError(
            f"{label} has no property {field!r} (class_field); its properties: "
            f"{', '.join(layer.properties[:20]) or 'none'}"
            + (f", ... ({len(layer.properties)} in all)" if len(layer.properties) > 20 else "")
        )
    geometries = shapely.force_2d(layer.geometries)
    return replace(layer, geometries=geometries, crs=_named_crs(layer.crs, geometries))


def _read_ogr(data: bytes, field: str | None) -> _Layer:
    import pyogrio
    import shapely
    from pyproj import CRS

    with warnings.catch_warnings():
        # GDAL reads the bytes as an unnamed file, whose extension it cannot check.
        warnings.filterwarnings("ignore", "File /vsimem/.* non conformant file extension")
        # Only the class property is read (a file may have hundreds, OpenStreetMap's tags).
        meta, table = pyogrio.read_arrow(io.BytesIO(data), columns=[] if field is None else [field])
        found = field is None or field in table.column_names
        properties = meta["fields"] if found else pyogrio.read_info(io.BytesIO(data))["fields"]
    column = meta["geometry_name"] or "wkb_geometry"
    return _Layer(
        shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False)),
        table.column(field).to_pylist() if field is not None and found else None,
        None if meta["crs"] is None else CRS.from_user_input(meta["crs"]),
        tuple(str(name) for name in properties),
    )


def _read_geoparquet(data: bytes, label: str, field: str | None) -> _Layer:
    import pyarrow.parquet as pq
    import shapely
    from pyproj import CRS

    file = pq.ParquetFile(io.BytesIO(data))
    metadata = file.schema_arrow.metadata or {}
    if b"geo" not in metadata:
        raise GroundTruthError(f"{label} is Parquet without GeoParquet's 'geo' metadata")
    geo = json.loads(metadata[b"geo"])
    column = geo["primary_column"]
    described = geo["columns"][column]
    if str(described.get("encoding", "")).upper() != "WKB":
        raise GroundTruthError(
            f"{label}: geometry column {column!r} is encoded as {described.get('encoding')!r}; "
            "vector ground truth reads WKB"
        )
    properties = tuple(name for name in file.schema_arrow.names if name != column)
    wanted = [column] + ([field] if field in properties else [])
    table = file.read(columns=wanted)
    # GeoParquet: an absent crs is OGC:CRS84 (longitude, latitude), a null one unknown.
    crs = described.get("crs", "OGC:CRS84")
    if isinstance(crs, dict):
        crs = CRS.from_json_dict(crs)
    elif crs is not None:
        crs = CRS.from_user_input(crs)
    return _Layer(
        shapely.from_wkb(table.column(column).to_numpy(zero_copy_only=False)),
        table.column(field).to_pylist() if field in properties else None,
        crs,
        properties,
    )


def _named_crs(crs: Any, geometries: np.ndarray) -> Any:
    """The CRS the file names: ``crs``, unless it is longitude and latitude and the
    coordinates cannot be (GeoJSON without a ``crs`` member reads as WGS 84 whatever its
    coordinates), then None."""
    import shapely

    if crs is None or not crs.is_geographic:
        return crs
    present = geometries[~shapely.is_missing(geometries) & ~shapely.is_empty(geometries)]
    if not len(present):
        return crs
    west, south, east, north = shapely.total_bounds(present)
    lon_lat = west >= -180 and east <= 180 and south >= -90 and north <= 90
    return crs if lon_lat else None


class _Vector(GroundTruth):
    options = frozenset({"class", "class_field", "background"})

    def __init__(
        self,
        spec: str,
        location: str,
        options: dict,
        ignore_index: int | None,
        model: ModelClasses | None,
    ) -> None:
        super().__init__(spec)
        try:
            import pyogrio  # noqa: F401
            import pyproj  # noqa: F401
            import rasterio  # noqa: F401
            import shapely
        except ImportError as error:
            from segflow.raster import INSTALL_HINT

            raise GroundTruthError(
                f"ground truth {spec!r} needs {error.name}, which is not installed: {INSTALL_HINT}"
            ) from error

        if model is None:
            raise GroundTruthError(
                f"ground truth {spec!r}: vector ground truth is opened for a model (its classes "
                "name the polygons' classes)"
            )
        self.kind = model.task
        self._location = location
        self._ignore_index = ignore_index
        classes = list(model.classes)
        if ("class" in options) == ("class_field" in options):
            raise GroundTruthError(
                f"ground truth {spec!r} needs one of ?class=NAME (every polygon that class) or "
                "?class_field=PROPERTY (each polygon's class name in that property)"
            )
        label = f"vector ground truth {location!r}"

        def class_id(name: Any, what: str) -> int:
            if name not in classes:
                raise GroundTruthError(
                    f"ground truth {spec!r}: {what} {name!r} is not a class of the model "
                    f"(its classes: {', '.join(classes)})"
                )
            return classes.index(name)

        fixed = None if "class" not in options else class_id(options["class"], "class")
        background = options.get("background")
        if background is not None and model.task != "semantic":
            raise GroundTruthError(
                f"ground truth {spec!r}: background= applies to semantic models; an instance "
                "model's objects are the polygons"
            )
        if background is None and model.task == "semantic":
            background = next((name for name in _BACKGROUND_NAMES if name in classes), None)
        self._background = None if background is None else class_id(background, "background")

        field = options.get("class_field")
        layer = _read_layer(_read_bytes(location, label), label, field)
        kept = ~shapely.is_missing(layer.geometries) & ~shapely.is_empty(layer.geometries)
        other = np.flatnonzero(kept & ~np.isin(shapely.get_type_id(layer.geometries), _POLYGONAL))
        if len(other):
            raise GroundTruthError(
                f"{label}: {len(other)} feature(s) are not polygons, the first feature "
                f"{other[0]} a {layer.geometries[other[0]].geom_type}; vector ground truth "
                "takes polygons and multipolygons"
            )
        if fixed is not None:
            ids = np.full(len(layer.geometries), fixed, np.int64)
        else:
            values = layer.values
            missing = [i for i, value in enumerate(values) if kept[i] and value in (None, "")]
            if missing:
                raise GroundTruthError(
                    f"{label}: {len(missing)} feature(s) have no {field!r} value (class_field), "
                    f"the first feature {missing[0]}"
                )
            by_name = {name: class_id(name, f"{field!r} value") for name in set(values) if name}
            ids = np.array([by_name.get(value, -1) for value in values], np.int64)
        self._geometries = layer.geometries[kept]
        self._class_ids = ids[kept]
        self._crs = layer.crs
        self._tree = shapely.STRtree(self._geometries)
        labelled = set(self._class_ids.tolist())
        self._evaluated = frozenset(
            labelled | (set() if self._background is None else {self._background})
        )
        # Instance ground truth: the model's class ids are the COCO category ids.
        if self.kind == "instance":
            self.categories = {i: classes[i] for i in sorted(labelled)}

    def label_values(self) -> Container[int]:
        return self._evaluated

    def target(self, uri: str, grid: RasterGrid | None = None) -> SemanticTarget | InstanceTarget:
        where = f"ground truth for {uri!r}"
        if grid is None or grid.transform is None:
            raise GroundTruthError(
                f"{where}: {self.spec!r} is rasterized onto a georeferenced raster's grid, and "
                "this image is not a georeferenced raster"
            )
        geometries, class_ids = self._on_grid(grid, where)
        if self.kind == "instance":
            return self._instances(uri, grid, geometries, class_ids)
        from rasterio.features import rasterize
        from rasterio.transform import Affine

        shape = (grid.height, grid.width)
        fill = UNLABELLED if self._background is None else self._background
        if len(geometries):
            labels = rasterize(
                zip(geometries, class_ids.tolist(), strict=True),
                out_shape=shape,
                transform=Affine(*grid.transform),
                fill=fill,
                all_touched=False,
                dtype="int32",
            ).astype(np.int64)
        else:
            labels = np.full(shape, fill, np.int64)
        return SemanticTarget(
            _ignoring(labels, self._ignore_index), self._location, classes=self._evaluated
        )

    def _on_grid(self, grid: RasterGrid, where: str) -> tuple[np.ndarray, np.ndarray]:
        """The polygons meeting the raster's footprint, in file order, in the raster's CRS,
        and their class ids."""
        import shapely
        from pyproj import CRS, Transformer

        raster_crs = None if grid.crs is None else CRS.from_user_input(grid.crs)
        file_crs = self._crs if self._crs is not None else raster_crs
        if raster_crs is None and file_crs is not None:
            raise GroundTruthError(
                f"{where}: the raster has no CRS and {self._location!r} is in {file_crs.name}: "
                "its polygons cannot be placed on the raster"
            )
        a, b, c, d, e, f = grid.transform
        corners = [(0, 0), (grid.width, 0), (grid.width, grid.height), (0, grid.height)]
        footprint = shapely.Polygon([(a * x + b * y + c, d * x + e * y + f) for x, y in corners])
        reprojected = file_crs is not None and not file_crs.equals(raster_crs)
        if reprojected:
            # Densified, so that the footprint's curved image in the file's CRS is covered.
            footprint = shapely.transform(
                shapely.segmentize(footprint, footprint.length / 256),
                Transformer.from_crs(raster_crs, file_crs, always_xy=True).transform,
                interleaved=False,
            )
        hits = np.sort(self._tree.query(footprint, predicate="intersects"))
        geometries = self._geometries[hits]
        if reprojected and len(geometries):
            geometries = shapely.transform(
                geometries,
                Transformer.from_crs(file_crs, raster_crs, always_xy=True).transform,
                interleaved=False,
            )
        return geometries, self._class_ids[hits]

    def _instances(
        self, uri: str, grid: RasterGrid, geometries: np.ndarray, class_ids: np.ndarray
    ) -> InstanceTarget:
        import shapely
        from rasterio.features import rasterize
        from rasterio.transform import Affine

        transform = Affine(*grid.transform)
        inverse = ~transform
        image_id = _vector_image_id(uri)
        annotations = []
        for geometry, class_id in zip(geometries, class_ids.tolist(), strict=True):
            # The polygon's pixel window: its box's corners on the grid, outwards.
            west, south, east, north = shapely.bounds(geometry).tolist()
            corners = [inverse @ (x, y) for x in (west, east) for y in (south, north)]
            columns, rows = np.array(corners).T
            top = max(0, int(np.floor(rows.min())))
            bottom = min(grid.height, int(np.ceil(rows.max())))
            left = max(0, int(np.floor(columns.min())))
            right = min(grid.width, int(np.ceil(columns.max())))
            if top >= bottom or left >= right:
                continue
            mask = rasterize(
                [(geometry, 1)],
                out_shape=(bottom - top, right - left),
                transform=transform @ Affine.translation(left, top),
                fill=0,
                all_touched=False,
                dtype="uint8",
            )
            if grid.valid is not None:
                mask &= grid.valid[top:bottom, left:right]
            if not mask.any():
                continue  # a sliver between pixel centres, or over nodata: no object
            measured = _placed_rle(mask, top, left, grid.height, grid.width)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_id,
                    "segmentation": {
                        "size": [grid.height, grid.width],
                        "counts": measured.rles[0]["counts"].decode("ascii"),
                    },
                    "area": float(measured.areas[0]),
                    "bbox": measured.boxes[0].tolist(),
                    "iscrowd": 0,
                }
            )
        return InstanceTarget(
            grid.height, grid.width, annotations, f"{self._location}{_IMAGE_ID_MARK}{image_id}"
        )


def _vector_image_id(uri: str) -> int:
    """The COCO image id of a raster's vector ground truth: its segflow image id, unique in a
    run (COCOeval keys images by it)."""
    from segflow.schema import image_id_for

    return image_id_for(uri)


def _placed_rle(mask: np.ndarray, top: int, left: int, height: int, width: int) -> rle.Measured:
    """The RLE, area and box of a ``height x width`` mask that is 0 but for the window
    ``mask`` (with a pixel set) at (``top``, ``left``), from the window's pixels alone: a
    raster's plane is never made."""
    return rle.encode_crops_measured([(top, left, mask.astype(bool))], height, width)


_ADAPTERS: dict[str, type[GroundTruth]] = {
    "coco": _CocoInstances,
    "masks": _LabelMaps,
    "coco-semantic": _CocoSemantic,
    "vector": _Vector,
}
