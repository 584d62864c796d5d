"""Fixtures of the namespace test bed tests: one random image shared by the module (its helpers: bed_helpers.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.processes import write_random_image

# Big enough that a loop lasts a few seconds at the bed's send rate (so a kill lands mid-transfer and a
# late join is late), small enough that the whole module stays within a few minutes on two cores.
IMAGE_MIB = 32
IMAGE_SEED = 20240613


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    directory: Path
    """What `vmcast serve --images` is given."""
    name: str
    """The image's name on the server."""
    sha1: str
    length: int


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    directory = tmp_path_factory.mktemp("images")
    name = "disk.raw"
    sha1 = write_random_image(directory / name, IMAGE_MIB, seed=IMAGE_SEED)
    return Image(directory=directory, name=name, sha1=sha1, length=IMAGE_MIB << 20)
