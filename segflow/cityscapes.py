"""Cityscapes' conventions, as cityscapesScripts (``helpers/labels.py``, ``evaluation/
evalPixelLevelSemanticLabeling.py``) defines them; a test checks these tables against it.

- :data:`LABELS`: every label of the annotation files, with its label id (the value of a
  ``*_gtFine_labelIds.png`` pixel), train id (0-18, the 19 evaluated classes, or None where
  the label is ignored), category, and whether it has instances;
- :data:`TRAIN_IDS`: label id -> train id of the 19 classes; every other label id is ignored
  (``masks:DIR?id_map=cityscapes``);
- :data:`CATEGORIES`: the 7 evaluated categories (``void`` holds no evaluated class), each
  with its classes' train ids;
- :data:`AVERAGE_INSTANCE_SIZE`: train id -> the class's average instance size in pixels over
  the training set, for the 8 classes with instances: iIoU weighs an instance's true-positive
  and false-negative pixels by this size over the instance's size;
- :data:`INSTANCE_CATEGORIES`: the categories all of whose labels have instances (``human``,
  ``vehicle``), the only ones with a category iIoU.

Instance files (``*_gtFine_instanceIds.png``): a pixel value ``v > 1000`` is an instance of
label id ``v // 1000``; smaller values are label ids of pixels outside any instance.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AVERAGE_INSTANCE_SIZE",
    "CATEGORIES",
    "INSTANCE_CATEGORIES",
    "LABELS",
    "TRAIN_IDS",
    "Label",
]


@dataclass(frozen=True)
class Label:
    name: str
    label_id: int
    train_id: int | None  # None: not evaluated
    category: str
    has_instances: bool


LABELS = tuple(
    Label(*row)
    for row in (
        ("unlabeled", 0, None, "void", False),
        ("ego vehicle", 1, None, "void", False),
        ("rectification border", 2, None, "void", False),
        ("out of roi", 3, None, "void", False),
        ("static", 4, None, "void", False),
        ("dynamic", 5, None, "void", False),
        ("ground", 6, None, "void", False),
        ("road", 7, 0, "flat", False),
        ("sidewalk", 8, 1, "flat", False),
        ("parking", 9, None, "flat", False),
        ("rail track", 10, None, "flat", False),
        ("building", 11, 2, "construction", False),
        ("wall", 12, 3, "construction", False),
        ("fence", 13, 4, "construction", False),
        ("guard rail", 14, None, "construction", False),
        ("bridge", 15, None, "construction", False),
        ("tunnel", 16, None, "construction", False),
        ("pole", 17, 5, "object", False),
        ("polegroup", 18, None, "object", False),
        ("traffic light", 19, 6, "object", False),
        ("traffic sign", 20, 7, "object", False),
        ("vegetation", 21, 8, "nature", False),
        ("terrain", 22, 9, "nature", False),
        ("sky", 23, 10, "sky", False),
        ("person", 24, 11, "human", True),
        ("rider", 25, 12, "human", True),
        ("car", 26, 13, "vehicle", True),
        ("truck", 27, 14, "vehicle", True),
        ("bus", 28, 15, "vehicle", True),
        ("caravan", 29, None, "vehicle", True),
        ("trailer", 30, None, "vehicle", True),
        ("train", 31, 16, "vehicle", True),
        ("motorcycle", 32, 17, "vehicle", True),
        ("bicycle", 33, 18, "vehicle", True),
        ("license plate", -1, None, "vehicle", False),
    )
)

TRAIN_IDS = {label.label_id: label.train_id for label in LABELS if label.train_id is not None}

CATEGORIES: dict[str, tuple[int, ...]] = {}
for _label in LABELS:
    if _label.train_id is not None:
        CATEGORIES.setdefault(_label.category, ())
        CATEGORIES[_label.category] += (_label.train_id,)

# Labels with a negative id are not in the annotation files, so they do not bar a category.
INSTANCE_CATEGORIES = tuple(
    category
    for category in CATEGORIES
    if all(
        label.has_instances
        for label in LABELS
        if label.category == category and label.label_id >= 0
    )
)

_SIZES = {
    "bicycle": 4672.3249222261,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
}
AVERAGE_INSTANCE_SIZE = {
    label.train_id: _SIZES[label.name]
    for label in LABELS
    if label.has_instances and label.train_id is not None
}
