"""Sample-data contribution: the bundled CC0 slide CMU-1-Small-Region.svs."""

from __future__ import annotations

from .._resources import sample_slide_path
from ..slide import open_slide
from .reader import slide_layer_data


def sample_slide() -> list[tuple]:
    return [slide_layer_data(open_slide(sample_slide_path()))]
