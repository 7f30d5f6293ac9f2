"""Verifying shards names every kind of damage with its shard and key; stats count without
decoding pixels."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from slurmvision.errors import DataError
from slurmvision.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo
from slurmvision.shards.stats import shard_stats
from slurmvision.shards.verify import verify_shards
from slurmvision.shards.writer import build_shards

from ..conftest import CLASSES

pytestmark = pytest.mark.unit

IMAGE_SUFFIXES = (".png", ".jpg", ".webp")


@pytest.fixture
def built(image_folder, tmp_path) -> tuple[Path, Manifest]:
    out = tmp_path / "shards"
    return out, build_shards(image_folder, out, samples_per_shard=6, progress=False)


def first_member(shard: Path, suffixes: tuple[str, ...]) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return next(m for m in tar.getmembers() if m.name.endswith(suffixes))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def problems(report) -> list[tuple[str, str, str]]:
    return [(b["shard"], b["key"], b["problem"]) for b in report.to_json()["bad"]]


def test_clean_shards_verify(built):
    out, manifest = built
    report = verify_shards(out)
    assert report.to_json() == {"ok": True, "shards": 6, "samples": 36, "bad": []}
    assert verify_shards(out, workers=2).to_json() == report.to_json()


def test_flipped_byte_in_an_image_names_the_sample(built):
    out, manifest = built
    shard = out / manifest.shards[0].name
    image = first_member(shard, IMAGE_SUFFIXES)
    flip_byte(shard, image.offset_data)  # the image's magic number: it cannot decode now
    key = image.name.split(".")[0]
    found = problems(verify_shards(out))
    assert found[:2] == [(shard.name, "", "sha256 mismatch"), (shard.name, key, found[1][2])]
    assert found[1][2] == "image does not decode: not a known image format" and len(found) == 2


def test_flipped_byte_in_metadata_is_caught_by_the_hash(built):
    out, manifest = built
    shard = out / manifest.shards[1].name
    flip_byte(shard, first_member(shard, (".json",)).offset_data)
    assert problems(verify_shards(out)) == [(shard.name, "", "sha256 mismatch")]


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary"])
def test_truncated_tar(built, where):
    out, manifest = built
    shard = out / manifest.shards[2].name
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = {m.name.split(".")[0] for m in members}
    # Cut within the third image, or right after the fourth sample (no end-of-archive marker).
    image = [m for m in members if m.name.endswith(IMAGE_SUFFIXES)][2]
    cut = image.offset_data + image.size // 2 if where == "inside a member" else members[12].offset
    shard.write_bytes(shard.read_bytes()[:cut])
    report = verify_shards(out)
    assert not report.ok and report.samples < 36
    found = problems(report)
    assert (shard.name, "", "sha256 mismatch") in found
    assert any(s == shard.name and p.startswith(f"size {cut} bytes") for s, _, p in found)
    truncated = [(k, p) for s, k, p in found if "truncated" in p]
    assert len(truncated) == 1 and truncated[0][0] in keys | {""} and len(found) == 4
    assert (shard.name, "", f"{report.samples - 30} samples, manifest says 6") in found


def test_missing_shard_and_extra_tar(built):
    out, manifest = built
    (out / manifest.shards[-1].name).unlink()
    (out / "stray-000000.tar").write_bytes(b"")
    report = verify_shards(out)
    assert problems(report) == [
        (manifest.shards[-1].name, "", "shard file is missing"),
        ("stray-000000.tar", "", "tar file not in the manifest"),
    ]
    assert report.samples == 36 - manifest.shards[-1].count


def test_count_mismatch_with_the_manifest(built):
    out, manifest = built
    data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    data["shards"][0]["count"] += 1
    (out / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    assert problems(verify_shards(out)) == [(manifest.shards[0].name, "", "6 samples, manifest says 7")]


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> ShardInfo:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples.items():
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    return ShardInfo(path.name, "train", len(samples), len(data), hashlib.sha256(data).hexdigest())


def test_bad_labels_and_fields_in_a_hand_made_shard(built):
    out, manifest = built
    with tarfile.open(out / manifest.shards[0].name) as tar:
        image = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        png = tar.extractfile(image).read()
    info = write_tar(
        out / "train-000099.tar",
        {
            "good": {"png": png, "cls": b"2"},
            "high": {"png": png, "cls": b"12"},
            "negative": {"png": png, "cls": b"-1"},
            "text": {"png": png, "cls": b"dog"},
            "nolabel": {"png": png, "json": b"{}"},
            "twoimages": {"png": png, "jpg": png, "cls": b"0"},
            "noimage": {"cls": b"0"},
        },
    )
    manifest.shards.append(info)
    manifest.save(out)
    found = [(k, p) for s, k, p in problems(verify_shards(out)) if s == info.name]
    assert found == [
        ("high", "label 12 out of range 0..2"),
        ("negative", "label -1 out of range 0..2"),
        ("text", "label b'dog' is not an integer"),
        ("nolabel", "no cls (label) field"),
        ("twoimages", "expected one image, found 2 (cls, jpg, png)"),
        ("noimage", "expected one image, found 0 (cls)"),
    ]
    assert len(problems(verify_shards(out))) == len(found)


def test_verify_without_a_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no manifest.json in"):
        verify_shards(tmp_path)


def test_workers_report_the_same_problems(built):
    out, manifest = built
    shard = out / manifest.shards[3].name
    flip_byte(shard, first_member(shard, IMAGE_SUFFIXES).offset_data)
    (out / manifest.shards[4].name).write_bytes((out / manifest.shards[4].name).read_bytes()[:2000])
    assert verify_shards(out, workers=2).to_json() == verify_shards(out).to_json()


def test_stats_count_classes_sizes_and_formats_without_decoding(built, image_folder):
    out, manifest = built
    stats = shard_stats(out)
    assert stats["classes"] == 3 and list(stats["splits"]) == ["train", "val"]
    train, val = stats["splits"]["train"], stats["splits"]["val"]
    assert {k: train[k] for k in ("samples", "shards", "bytes")} == manifest.splits["train"]
    assert train["per_class"] == {name: 8 for name in sorted(CLASSES)}
    assert val["per_class"] == {name: 4 for name in sorted(CLASSES)}
    assert train["width"] == {"min": 20, "median": 20, "max": 20} and val["height"]["max"] == 17
    suffixes = [p.suffix.lower().replace("jpeg", "jpg") for p in (image_folder / "train").rglob("img.*")]
    assert train["formats"] == {ext: suffixes.count(f".{ext}") for ext in ("jpg", "png", "webp")}
    # Pixels are not read: an image that no longer decodes changes nothing.
    shard = out / manifest.shards[0].name
    flip_byte(shard, first_member(shard, IMAGE_SUFFIXES).offset_data)
    assert shard_stats(out) == stats
    # A shard that cannot be indexed is an error, not a silent undercount.
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match="truncated.*slurmvision shards verify"):
        shard_stats(out)
