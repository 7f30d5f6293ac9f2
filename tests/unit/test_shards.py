"""Shards: build from ImageFolder, byte-identical rebuilds, verify finds damage, stats count."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from slurmvision.errors import DataError
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.stats import shard_stats
from slurmvision.shards.verify import verify_shards
from slurmvision.shards.writer import build_shards

from ..conftest import CLASSES, make_imagefolder

pytestmark = pytest.mark.unit


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.tar"))}


def test_build_writes_every_image_once_with_original_bytes(image_folder, tmp_path):
    manifest = build_shards(image_folder, tmp_path / "out", samples_per_shard=5, progress=False)
    assert manifest.classes == sorted(CLASSES)
    assert manifest.splits["train"] == {"samples": 24, "shards": 5, "bytes": manifest.splits["train"]["bytes"]}
    assert manifest.splits["val"]["samples"] == 12
    seen = {}
    for info in manifest.shards:
        found = members(tmp_path / "out" / info.name)
        keys = {name.split(".")[0] for name in found}
        assert len(keys) == info.count
        for name, data in found.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                image = next(v for n, v in found.items() if n.startswith(key + ".") and n.split(".")[1] in ("png", "jpg", "webp"))
                assert image == (image_folder / meta["path"]).read_bytes()
                assert int(found[key + ".cls"]) == manifest.classes.index(meta["class"])
                seen[meta["path"]] = key
    sources = {str(p.relative_to(image_folder)) for p in image_folder.rglob("img.*")}
    assert set(seen) == sources and len(set(seen.values())) == len(sources)


def test_rebuild_is_byte_identical_and_parallel_matches(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "a", samples_per_shard=7, progress=False)
    build_shards(image_folder, tmp_path / "b", samples_per_shard=7, progress=False)
    build_shards(image_folder, tmp_path / "c", samples_per_shard=7, workers=2, progress=False)
    assert digests(tmp_path / "a") == digests(tmp_path / "b") == digests(tmp_path / "c")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "c" / "manifest.json").read_bytes()


def test_shard_size_and_max_side(tmp_path):
    src = make_imagefolder(tmp_path / "big", per_class=4, splits=("train",), size=(300, 200))
    manifest = build_shards(src, tmp_path / "out", shard_size_mb=0.4, max_side=64, progress=False)
    assert manifest.splits["train"]["shards"] >= 1
    stats = shard_stats(tmp_path / "out")["splits"]["train"]
    assert stats["width"]["max"] == 64 and stats["height"]["max"] == 43
    by_size = build_shards(src, tmp_path / "out2", shard_size_mb=0.2, progress=False)
    assert by_size.splits["train"]["shards"] > 1
    assert all(s.bytes <= 0.2 * 2**20 + 300 * 200 * 3 + 10240 for s in by_size.shards)


def test_bad_inputs_are_clear_errors_and_leave_nothing(tmp_path, image_folder):
    with pytest.raises(DataError, match="does not exist"):
        build_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        build_shards(tmp_path / "empty", tmp_path / "out")
    (image_folder / "train" / "Ünï" / "img.broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="cannot read image .*img.broken.png"):
        build_shards(image_folder, tmp_path / "out", samples_per_shard=4, progress=False)
    assert not list((tmp_path / "out").glob("*.tmp")) and not (tmp_path / "out" / "manifest.json").exists()


def test_refuses_to_overwrite(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        build_shards(image_folder, tmp_path / "out", progress=False)
    build_shards(image_folder, tmp_path / "out", overwrite=True, progress=False)


def test_verify_clean_and_damaged(image_folder, tmp_path):
    out = tmp_path / "out"
    manifest = build_shards(image_folder, out, samples_per_shard=6, progress=False)
    report = verify_shards(out)
    assert report.ok and report.samples == 36 and report.shards == len(manifest.shards)

    # A flipped byte inside one image: hash mismatch, and the sample is named.
    first = out / manifest.shards[0].name
    with tarfile.open(first) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".webp")))
    data = bytearray(first.read_bytes())
    data[image.offset_data + image.size // 2] ^= 0xFF
    data[image.offset_data: image.offset_data + 16] = b"\0" * 16
    first.write_bytes(bytes(data))
    # A truncated shard.
    second = out / manifest.shards[1].name
    second.write_bytes(second.read_bytes()[:1500])
    # A tar the manifest does not know.
    (out / "stray-000000.tar").write_bytes(b"")
    report = verify_shards(out, workers=2).to_json()
    assert not report["ok"]
    problems = {(b["shard"], b["problem"].split(":")[0]) for b in report["bad"]}
    assert (manifest.shards[0].name, "sha256 mismatch") in problems
    assert any(b["shard"] == manifest.shards[0].name and b["key"] == image.name.split(".")[0]
               and "does not decode" in b["problem"] for b in report["bad"])
    assert any(b["shard"] == manifest.shards[1].name and "truncated" in b["problem"] for b in report["bad"])
    assert ("stray-000000.tar", "tar file not in the manifest") in problems


def test_verify_reports_bad_labels(tmp_path, image_folder):
    out = tmp_path / "out"
    manifest = build_shards(image_folder, out, samples_per_shard=100, progress=False)
    shard = out / manifest.shards[0].name
    found = members(shard)
    key = sorted(found)[0].split(".")[0]
    found[f"{key}.cls"] = b"7"
    with tarfile.open(shard, "w") as tar:
        for name, data in sorted(found.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = verify_shards(out)
    assert any(b["key"] == key and b["problem"] == "label 7 out of range 0..2" for b in report.bad)


def test_manifest_errors(tmp_path):
    with pytest.raises(DataError, match="shards build"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(DataError, match="not a valid manifest"):
        Manifest.load(tmp_path)


def test_stats_counts_classes(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "out", progress=False)
    stats = shard_stats(tmp_path / "out")
    assert stats["splits"]["train"]["per_class"] == {name: 8 for name in sorted(CLASSES)}
    assert set(stats["splits"]["train"]["formats"]) == {"png", "jpg", "webp"}
