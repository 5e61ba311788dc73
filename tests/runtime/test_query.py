"""`Query`: one image, several images (in order), a text, or images with a text (issue 16)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pue.errors import InputError
from pue.runtime import Query


def test_kinds_and_image_lists():
    a, b = Path("a.png"), Path("b.png")
    assert Query(image=a).kind == "image" and Query(image=a).image_list == [a]
    assert Query(images=[a, b]).kind == "image" and Query(images=[b, a]).image_list == [b, a]
    assert Query(images=(a,), text="x").kind == "composed"
    assert Query(text="x").kind == "text" and Query(text="x").image_list == []
    assert Query(images=iter([a, b])).images == (a, b)  # any iterable, kept in order


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": Path("a.png"), "images": [Path("b.png")]}, "image= or images=, not both"),
        ({"images": []}, "images= is empty"),
        ({"images": "a.png"}, "a sequence of images, got a single str"),
        ({"images": np.zeros((4, 4, 3), np.uint8)}, "got a single ndarray"),
    ],
)
def test_bad_queries_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        Query(**kwargs)


def test_a_query_needs_something():
    with pytest.raises(InputError, match="needs an image, a text, or both"):
        _ = Query().kind
