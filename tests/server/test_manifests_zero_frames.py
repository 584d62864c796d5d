"""Manifest cache entries keep the zero frames (`Manifest.zero_frames`): never sent, so an entry that lost or
garbled them would make the sender send zeros, or skip data. Entries from before zero frames are rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from vmcast.protocol import default_block_size, manifest_of
from vmcast.server.manifests import ManifestStore

FRAME = 1400
BLOCK = default_block_size(FRAME)  # 749 frames
ZERO_FRAMES = ((759, 10), (1449, 49), (1498, 1))


def image_with_zero_frames() -> bytes:
    """Block 0 zeros; block 1 random but frames 10-19 and 700-748 (of the block); block 2 random but its
    first frame; a short random tail."""
    frames = [bytes(FRAME)] * 749
    frames += [bytes(FRAME) if 10 <= k < 20 or k >= 700 else os.urandom(FRAME) for k in range(749)]
    frames += [bytes(FRAME)] + [os.urandom(FRAME) for _ in range(748)]
    return b"".join(frames) + os.urandom(999)


def cached(tmp_path: Path, key: str) -> tuple[Path, Path]:
    path = tmp_path / "image"
    path.write_bytes(image_with_zero_frames())
    built = ManifestStore(cache_dir=tmp_path / "cache").get(path, key=key, name="z", format="raw", frame_size=FRAME)
    assert built.zero_blocks == ((0, 1),) and built.zero_frames == ZERO_FRAMES
    [entry] = (tmp_path / "cache" / "manifests").iterdir()
    return path, entry


def test_a_cached_manifest_keeps_its_zero_frames(tmp_path: Path) -> None:
    path, entry = cached(tmp_path, "7" * 64)
    assert json.loads(entry.read_text())["zero_frames"] == [list(run) for run in ZERO_FRAMES]
    restarted = ManifestStore(cache_dir=tmp_path / "cache")
    loaded = restarted.get(path, key="7" * 64, name="z", format="raw", frame_size=FRAME)
    assert restarted.builds == 0
    assert loaded == manifest_of(path.read_bytes(), name="z", frame_size=FRAME)
    assert loaded.zero_frames == ZERO_FRAMES


def test_a_cache_entry_from_before_zero_frames_is_computed_again_not_loaded_without_them(tmp_path: Path) -> None:
    path, entry = cached(tmp_path, "8" * 64)
    fields = json.loads(entry.read_text())
    del fields["zero_frames"]
    entry.write_text(json.dumps(dict(fields, version=2)))  # what a server before zero frames wrote
    store = ManifestStore(cache_dir=tmp_path / "cache")
    assert store.get(path, key="8" * 64, name="z", format="raw", frame_size=FRAME).zero_frames == ZERO_FRAMES
    assert store.builds == 1
    assert json.loads(entry.read_text())["version"] == 3, "the entry is written anew"


@pytest.mark.parametrize(
    "zero_frames",
    [
        None, "759-768", [[759]], [[759, 0]], [[759, True]], [[759, 10.0]],
        [[1449, 49], [759, 10]],  # descending
        [[759, 10], [765, 2]],  # overlapping
        [[0, 5]],  # in the zero block
        [[1449, 50]],  # leaves its block
        [[2246, 3]],  # past the image
        [[749 + 2 * k, 1] for k in range(17)],  # more runs in a block than the builder announces
    ],
    ids=["missing", "string", "single", "empty-run", "bool", "float", "descending", "overlapping", "in-a-zero-block",
         "leaves-its-block", "past-the-end", "too-many-runs"],
)
def test_a_cache_entry_with_doubtful_zero_frames_is_computed_again(tmp_path: Path, zero_frames: object) -> None:
    path, entry = cached(tmp_path, "9" * 64)
    fields = json.loads(entry.read_text())
    if zero_frames is None:
        del fields["zero_frames"]
    else:
        fields["zero_frames"] = zero_frames
    entry.write_text(json.dumps(fields))
    store = ManifestStore(cache_dir=tmp_path / "cache")
    assert store.get(path, key="9" * 64, name="z", format="raw", frame_size=FRAME).zero_frames == ZERO_FRAMES
    assert store.builds == 1
