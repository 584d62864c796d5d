"""Manifests (SHA-1 and per-block xxh3 of what a stream sends), made in one read pass and cached on disk.

A manifest is cached as ``<cache>/manifests/<key>.<format>.<frame size>.json``, its key the SHA-256 of the
source (and, for a conversion, the converted file's inode and mtime: see `vmcast.server.preparation`): keyed
by content like the converted images, so it is computed once per image content, format and frame size, and
a server that starts again announces its streams without reading the images. The image name is not part of
the cache entry (two names for the same bytes share it); it is set when the manifest is loaded.

An entry holds everything the stream announces, zero blocks and zero frames included (``"zero_blocks":
[[first, count], ...]`` and ``"zero_frames": [[first frame, count], ...]``, the runs of `Manifest.zero_blocks`
and `Manifest.zero_frames`): those are never sent, so an entry that lost them would make the sender send
gigabytes of zeros. Entries of an older `_FORMAT_VERSION` (version 1 had no zero blocks, version 2 no zero
frames) are ignored and rebuilt, never loaded with a field missing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
from pathlib import Path

from vmcast.protocol import (
    MAX_ZERO_FRAME_RUNS_PER_BLOCK,
    Layout,
    Manifest,
    ManifestBuilder,
)

from .errors import ImageChanged
from .files import FileIdentity, read_in_chunks, write_atomically

log = logging.getLogger(__name__)

# 2: zero blocks; 3: zero frames. Bump it whenever an entry's meaning changes, so that old entries are
# rebuilt, not misread.
_FORMAT_VERSION = 3
_XXH3_HEX_DIGITS = 16
# Manifests used lately are also kept in memory, so that joining a running stream does not parse its JSON
# again (19 MB for a 1 TiB image). Each costs about 36 bytes per block: 36 MB for 1 TiB.
RECENT_MANIFESTS_KEPT = 16


class ManifestStore:
    """Loads, builds and saves manifests. Thread-safe: one build per cache entry at a time in this process.

    Error handling: `ImageChanged` if the file changes while it is read; `OSError` if it cannot be read.
    A damaged or outdated cache entry is ignored and rebuilt.
    """

    def __init__(self, *, cache_dir: Path) -> None:
        self._dir = cache_dir / "manifests"
        self._dir.mkdir(parents=True, exist_ok=True)
        self.builds = 0
        """How many times a manifest was computed by reading an image (what the cache saves)."""
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self._recent: collections.OrderedDict[Path, Manifest] = collections.OrderedDict()

    def get(self, path: Path, *, key: str, name: str, format: str, frame_size: int) -> Manifest:
        """The manifest of the file at `path` (whose source content key is `key`), cached or built now."""
        entry = self._entry(key=key, format=format, frame_size=frame_size)
        with self._guard:
            lock = self._locks.setdefault(entry, threading.Lock())
        with lock:
            length = path.stat().st_size
            with self._guard:
                manifest = self._recent.get(entry)
                if manifest is not None:
                    self._recent.move_to_end(entry)
            if manifest is None or manifest.layout.length != length:
                manifest = self.load(key=key, name=name, format=format, frame_size=frame_size, length=length)
                if manifest is None:
                    manifest = self.build(path, name=name, format=format, frame_size=frame_size)
                    self.save(manifest, key=key)
                with self._guard:
                    self._recent[entry] = manifest
                    while len(self._recent) > RECENT_MANIFESTS_KEPT:
                        self._recent.popitem(last=False)
            return manifest if manifest.name == name else dataclasses.replace(manifest, name=name)

    def build(self, path: Path, *, name: str, format: str, frame_size: int) -> Manifest:
        """Read the file once and compute its manifest."""
        log.info("computing the manifest of %s (%s)", path, format)
        builder = ManifestBuilder(name=name, format=format, frame_size=frame_size)
        before, after = read_in_chunks(path, builder.update)
        if not FileIdentity.of_stat(path, before).same_content_as(after):
            raise ImageChanged(path=path)
        with self._guard:
            self.builds += 1
        return builder.finish()

    def load(self, *, key: str, name: str, format: str, frame_size: int, length: int) -> Manifest | None:
        """The cached manifest, named `name`; None if there is none or it does not fit a file of `length` bytes."""
        entry = self._entry(key=key, format=format, frame_size=frame_size)
        try:
            fields = json.loads(entry.read_text())
            if fields["version"] != _FORMAT_VERSION:
                log.info("manifest cache entry %s is of an older format: computing it again", entry)
                return None
            sums = fields["block_xxh3"]
            layout = Layout(length=fields["length"], frame_size=fields["frame_size"], block_size=fields["block_size"])
            manifest = Manifest(
                name=name,
                format=fields["format"],
                sha1=fields["sha1"],
                layout=layout,
                block_xxh3=tuple(
                    int(sums[start : start + _XXH3_HEX_DIGITS], 16) for start in range(0, len(sums), _XXH3_HEX_DIGITS)
                ),
                zero_blocks=(zero_blocks := _parse_zero_runs(fields["zero_blocks"], block_count=layout.block_count)),
                zero_frames=_parse_zero_frame_runs(fields["zero_frames"], layout=layout, zero_blocks=zero_blocks),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.warning("ignoring damaged manifest cache entry %s: %s", entry, error)
            return None
        if (manifest.format, layout.frame_size, layout.length) != (format, frame_size, length) or len(
            manifest.block_xxh3
        ) != layout.block_count:
            log.warning("ignoring manifest cache entry %s: it does not describe this file", entry)
            return None
        return manifest

    def save(self, manifest: Manifest, *, key: str) -> None:
        layout = manifest.layout
        fields = {
            "version": _FORMAT_VERSION,
            "format": manifest.format,
            "sha1": manifest.sha1,
            "length": layout.length,
            "frame_size": layout.frame_size,
            "block_size": layout.block_size,
            # One hex string rather than a list: a 1 TiB image has a million blocks.
            "block_xxh3": "".join(f"{value:016x}" for value in manifest.block_xxh3),
            "zero_blocks": [[first, count] for first, count in manifest.zero_blocks],
            "zero_frames": [[first, count] for first, count in manifest.zero_frames],
        }
        write_atomically(
            self._entry(key=key, format=manifest.format, frame_size=layout.frame_size), json.dumps(fields).encode()
        )

    def _entry(self, *, key: str, format: str, frame_size: int) -> Path:
        return self._dir / f"{key}.{format}.{frame_size}.json"


def _parse_zero_runs(value: object, *, block_count: int) -> tuple[tuple[int, int], ...]:
    """The zero-block runs of a cache entry: ascending, apart, each inside the image. `ValueError` otherwise.

    A run that is wrong would make the sender skip blocks that hold data, so nothing doubtful is accepted.
    """
    if not isinstance(value, list):
        raise ValueError("'zero_blocks' is not a list")
    runs: list[tuple[int, int]] = []
    end_of_previous = 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(type(number) is int for number in item)):
            raise ValueError(f"zero block run {item!r} is not a [first, count] pair")
        first, count = item
        if count < 1 or first < end_of_previous or first + count > block_count:
            raise ValueError(f"zero block run {item!r} overlaps another or reaches past block {block_count - 1}")
        runs.append((first, count))
        end_of_previous = first + count
    return tuple(runs)


def _parse_zero_frame_runs(value: object, *, layout: Layout, zero_blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The zero-frame runs of a cache entry: ascending, apart, each inside one block that is not a zero block,
    at most `MAX_ZERO_FRAME_RUNS_PER_BLOCK` per block (what `ManifestBuilder` makes). `ValueError` otherwise.

    A run that is wrong would make the sender skip frames that hold data, so nothing doubtful is accepted.
    """
    if not isinstance(value, list):
        raise ValueError("'zero_frames' is not a list")
    zero: set[int] = set()
    for first, count in zero_blocks:
        zero.update(range(first, first + count))
    per_block = layout.frames_per_block
    runs: list[tuple[int, int]] = []
    runs_in_block: collections.Counter[int] = collections.Counter()
    end_of_previous = 0
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and all(type(number) is int for number in item)):
            raise ValueError(f"zero frame run {item!r} is not a [first, count] pair")
        first, count = item
        block = first // per_block
        if count < 1 or first < end_of_previous or first + count > min((block + 1) * per_block, layout.frame_count):
            raise ValueError(f"zero frame run {item!r} overlaps another or leaves its block")
        if block in zero:
            raise ValueError(f"zero frame run {item!r} lies in a zero block")
        runs_in_block[block] += 1
        if runs_in_block[block] > MAX_ZERO_FRAME_RUNS_PER_BLOCK:
            raise ValueError(f"block {block} has more than {MAX_ZERO_FRAME_RUNS_PER_BLOCK} zero frame runs")
        runs.append((first, count))
        end_of_previous = first + count
    return tuple(runs)
