"""The images a server offers, detected by real qemu-img."""

from __future__ import annotations

import os

from .server_testing import Images, TestClient


def test_images_are_listed_with_the_formats_each_is_offered_in(client: TestClient, images: Images) -> None:
    listed = {image["name"]: image for image in client.get("/v1/images").json()}
    assert listed[images.raw] == {
        "name": images.raw,
        "formats": ["raw", "qcow2"],
        "size": images.path(images.raw).stat().st_size,
        "source_format": "raw",
        "virtual_size": images.path(images.raw).stat().st_size,
    }
    assert listed[images.qcow2]["formats"] == ["qcow2", "raw"]
    assert listed[images.qcow2]["source_format"] == "qcow2"
    assert listed[images.qcow2]["size"] == images.path(images.qcow2).stat().st_size
    assert listed[images.qcow2]["virtual_size"] >= images.path(images.raw).stat().st_size
    assert listed[images.empty]["size"] == 0


def test_hidden_files_directories_and_dangling_links_are_not_images(client: TestClient, images: Images) -> None:
    (images.directory / ".partial-upload").write_bytes(b"x" * 1000)
    (images.directory / "subdir").mkdir()
    os.symlink(images.directory / "nowhere", images.directory / "dangling")
    os.symlink(images.path(images.raw), images.directory / "alias.raw")
    names = [image["name"] for image in client.get("/v1/images").json()]
    assert names == sorted(["alias.raw", images.raw, images.qcow2, images.empty])


def test_a_replaced_image_is_looked_at_again(client: TestClient, images: Images) -> None:
    assert {i["name"]: i["source_format"] for i in client.get("/v1/images").json()}[images.qcow2] == "qcow2"
    staged = images.directory / ".staged"
    staged.write_bytes(os.urandom(4096))
    staged.rename(images.path(images.qcow2))
    assert {i["name"]: i["formats"] for i in client.get("/v1/images").json()}[images.qcow2] == ["raw", "qcow2"]
