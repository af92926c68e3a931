"""The colour segflow draws a class or a detection in, the same in every picture it makes
(``segflow show``, ``segflow report``)."""

from __future__ import annotations

import colorsys


def colour(index: int) -> tuple[int, int, int]:
    """Distinct colours for small indexes: hues a golden-ratio turn apart, so neighbouring
    ids never look alike, brightness alternating."""
    value = 0.95 if index % 2 == 0 else 0.75
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.8, value)
    return round(red * 255), round(green * 255), round(blue * 255)
