"""Building shards: every image once with its bytes, byte-identical rebuilds, size limits,
clear errors on bad input, and nothing half-written after a failed or killed build."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from slurmvision.cli import main
from slurmvision.errors import DataError
from slurmvision.shards.manifest import MANIFEST_NAME, Manifest
from slurmvision.shards.verify import verify_shards
from slurmvision.shards.writer import build_shards

from ..conftest import CLASSES, make_imagefolder

pytestmark = pytest.mark.unit

NORMALISED = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


def shard_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with plain tarfile (to the end, so a bad tar raises)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_samples(out: Path, manifest: Manifest) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for info in manifest.shards:
        for key, fields in shard_samples(out / info.name).items():
            assert key not in found, f"key {key} appears twice"
            found[key] = fields
    return found


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def sources(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in NORMALISED and not any(s.startswith(".") for s in p.parts[-3:])
    }


def test_manifest_lists_classes_shards_and_totals(image_folder, tmp_path):
    out = tmp_path / "out"
    manifest = build_shards(image_folder, out, samples_per_shard=5, progress=False)
    assert manifest.classes == ["02_x", "class a", "Ünï"] == sorted(CLASSES)
    assert [s.name for s in manifest.shards_for("train")] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s.count for s in manifest.shards_for("train")] == [5, 5, 5, 5, 4]
    assert [s.count for s in manifest.shards_for("val")] == [5, 5, 2]
    for info in manifest.shards:
        data = (out / info.name).read_bytes()
        assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    train_bytes = sum(s.bytes for s in manifest.shards_for("train"))
    assert manifest.splits == {
        "train": {"samples": 24, "shards": 5, "bytes": train_bytes},
        "val": {"samples": 12, "shards": 3, "bytes": manifest.splits["val"]["bytes"]},
    }
    on_disk = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert list(on_disk) == ["format_version", "classes", "splits", "shards"]
    assert on_disk["classes"] == {"02_x": 0, "class a": 1, "Ünï": 2}
    assert on_disk["splits"] == manifest.splits
    assert on_disk["shards"][0] == {
        "name": "train-000000.tar",
        "split": "train",
        "count": 5,
        "bytes": manifest.shards[0].bytes,
        "sha256": manifest.shards[0].sha256,
    }
    assert Manifest.load(out) == Manifest.load(out / MANIFEST_NAME) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *(s.name for s in manifest.shards)])


def test_every_image_stored_once_with_original_bytes(image_folder, tmp_path):
    # Hidden files and folders, and files that are not images, are not samples.
    png = next((image_folder / "train" / "Ünï").glob("*.png")).read_bytes()
    (image_folder / "train" / "Ünï" / ".hidden.png").write_bytes(png)
    for hidden in (image_folder / "train" / ".cache", image_folder / "train" / "Ünï" / ".thumbs"):
        hidden.mkdir()
        (hidden / "x.png").write_bytes(png)
    (image_folder / "train" / "Ünï" / "thumbs.db").write_bytes(b"junk")
    out = tmp_path / "out"
    manifest = build_shards(image_folder, out, samples_per_shard=7, progress=False)
    found = all_samples(out, manifest)
    expected = sources(image_folder)
    assert len(found) == len(expected) == 36
    seen = set()
    for key, fields in found.items():
        assert re.fullmatch(r"(train|val)-\d{8}", key)
        meta = json.loads(fields["json"])
        source = expected[meta["path"]]
        image_ext = NORMALISED[source.suffix.lower()]
        assert set(fields) == {image_ext, "cls", "json"}
        assert fields[image_ext] == source.read_bytes()
        assert meta == {"path": meta["path"], "class": source.parent.name, "width": 20, "height": 17}
        assert fields["cls"] == str(manifest.classes.index(source.parent.name)).encode()
        assert key.split("-")[0] == meta["path"].split("/")[0]
        seen.add(meta["path"])
    assert seen == set(expected)
    # The fixed shuffle mixes classes within a shard.
    first = shard_samples(out / "train-000000.tar")
    assert len({fields["cls"] for fields in first.values()}) > 1


def test_webdataset_reads_the_shards(image_folder, tmp_path):
    import webdataset

    manifest = build_shards(image_folder, tmp_path / "out", samples_per_shard=10, progress=False)
    urls = [str(tmp_path / "out" / s.name) for s in manifest.shards_for("train")]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(24)]
    assert all({"cls", "json"} < set(s) and len(set(s) & set(NORMALISED.values())) == 1 for s in samples)


def test_rebuild_is_byte_identical_and_workers_match(image_folder, tmp_path):
    build_shards(image_folder, tmp_path / "a", samples_per_shard=7, progress=False)
    build_shards(image_folder, tmp_path / "b", samples_per_shard=7, progress=False)
    build_shards(image_folder, tmp_path / "c", samples_per_shard=7, workers=2, progress=False)
    assert len(digests(tmp_path / "a")) == 4 + 2 + 1
    assert digests(tmp_path / "a") == digests(tmp_path / "b") == digests(tmp_path / "c")


def test_shard_size_mb_bounds_every_shard(image_folder, tmp_path):
    limit_mb = 0.02
    manifest = build_shards(image_folder, tmp_path / "out", shard_size_mb=limit_mb, progress=False)
    assert manifest.splits["train"]["shards"] > 1 and manifest.splits["train"]["samples"] == 24
    assert all(s.bytes <= limit_mb * 2**20 for s in manifest.shards)
    # A shard is cut only when the next sample would not fit: two neighbours never fit in one.
    train = manifest.shards_for("train")
    assert all(a.bytes + b.bytes > limit_mb * 2**20 for a, b in zip(train, train[1:]))
    both = build_shards(image_folder, tmp_path / "both", shard_size_mb=limit_mb, samples_per_shard=2, progress=False)
    assert {s.count for s in both.shards} == {2} and both.splits["val"]["samples"] == 12
    assert len(all_samples(tmp_path / "both", both)) == 36


def test_max_side_shrinks_large_images_once(tmp_path):
    from PIL import Image

    src = make_imagefolder(tmp_path / "big", per_class=4, splits=("train",), size=(60, 40))
    manifest = build_shards(src, tmp_path / "out", max_side=30, progress=False)
    for fields in all_samples(tmp_path / "out", manifest).values():
        meta = json.loads(fields["json"])
        (ext,) = set(fields) - {"cls", "json"}
        with Image.open(io.BytesIO(fields[ext])) as image:
            image.load()
            assert image.size == (meta["width"], meta["height"]) == (30, 20)
            assert image.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    # Images within the limit keep their original bytes.
    same = build_shards(src, tmp_path / "same", max_side=60, progress=False)
    for fields in all_samples(tmp_path / "same", same).values():
        meta = json.loads(fields["json"])
        (ext,) = set(fields) - {"cls", "json"}
        assert fields[ext] == (src / meta["path"]).read_bytes()


def test_refuses_to_overwrite_unless_asked(image_folder, tmp_path):
    out = tmp_path / "out"
    build_shards(image_folder, out, samples_per_shard=5, progress=False)
    with pytest.raises(DataError, match="already holds shards.*overwrite"):
        build_shards(image_folder, out, progress=False)
    manifest = build_shards(image_folder, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert manifest.splits["train"]["samples"] == 24 and verify_shards(out).ok


def test_bad_sources_and_options_are_clear_errors(tmp_path, image_folder):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"missing does not exist: give a directory with train/"):
        build_shards(tmp_path / "missing", out)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match=r"none of the split folders train, val, test.*/train/<class>/<image>"):
        build_shards(tmp_path / "flat", out)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="has no class folders"):
        build_shards(tmp_path / "empty", out)
    with pytest.raises(DataError, match=r"split folder .*test does not exist"):
        build_shards(image_folder, out, splits=["train", "test"])
    with pytest.raises(DataError, match="no dots"):
        build_shards(image_folder, out, splits=["train.v2"])
    with pytest.raises(DataError, match="samples_per_shard must be positive"):
        build_shards(image_folder, out, samples_per_shard=0)
    with pytest.raises(DataError, match="workers must be at least 1"):
        build_shards(image_folder, out, workers=0)
    (image_folder / "val" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class 'dog' in val/ is not in train/"):
        build_shards(image_folder, out)
    (image_folder / "val" / "dog").rmdir()
    for image in (image_folder / "val").rglob("img.*"):
        image.unlink()
    with pytest.raises(DataError, match=r"val holds no images .*add them or remove the folder"):
        build_shards(image_folder, out)
    assert not out.exists()
    # An explicit split list builds only those splits.
    manifest = build_shards(image_folder, out, splits=["train"], progress=False)
    assert list(manifest.splits) == ["train"]


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_fails_and_leaves_nothing(image_folder, tmp_path, workers):
    broken = image_folder / "train" / "Ünï" / "img.broken.png"
    broken.write_bytes(b"not a png at all")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(broken))}: .*fix or remove it"):
        build_shards(image_folder, out, samples_per_shard=4, workers=workers, progress=False)
    assert list(out.iterdir()) == []


def test_failed_rebuild_leaves_the_old_shards_and_the_users_files(image_folder, tmp_path):
    out = tmp_path / "out"
    build_shards(image_folder, out, samples_per_shard=5, progress=False)
    (out / "README.txt").write_text("where these images come from")
    (out / "extra.tar").write_bytes(b"not listed by the manifest: not the build's to delete")
    before = digests(out)
    broken = image_folder / "val" / "Ünï" / "img.broken.png"  # val comes last: the train shards are written first
    broken.write_bytes(b"not a png at all")
    for workers in (1, 2):
        with pytest.raises(DataError, match="cannot read image"):
            build_shards(image_folder, out, samples_per_shard=7, workers=workers, overwrite=True, progress=False)
        assert digests(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    broken.unlink()
    manifest = build_shards(image_folder, out, samples_per_shard=7, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.txt", "extra.tar", MANIFEST_NAME, *(s.name for s in manifest.shards)]
    )
    assert (out / "extra.tar").read_bytes() == b"not listed by the manifest: not the build's to delete"
    problems = {(b["shard"], b["problem"]) for b in verify_shards(out).bad}
    assert problems == {("extra.tar", "tar file not in the manifest")}


def test_output_in_the_image_folder_is_refused(image_folder):
    for out in (image_folder, image_folder / "shards", image_folder / "train" / "shards"):
        with pytest.raises(DataError, match=f"{re.escape(str(out))} is in the image folder .*write the shards outside"):
            build_shards(image_folder, out, progress=False)
    assert not (image_folder / "shards").exists()


def test_unwritable_output_is_one_clear_error(image_folder, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("root (with CAP_DAC_OVERRIDE) writes to any directory")
        for out in (locked, locked / "shards"):
            with pytest.raises(DataError, match=f"cannot write the shards to {re.escape(str(out))}: Permission denied"):
                build_shards(image_folder, out, progress=False)
            assert main(["shards", "build", str(image_folder), str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith("slurmvision: error: cannot write the shards") and "Traceback" not in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


KILL_ON_SECOND_RENAME = """
import os, signal, sys
from slurmvision.shards.writer import build_shards
real_replace, renames = os.replace, []
def replace(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the second shard is written in full but not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
build_shards(sys.argv[1], sys.argv[2], samples_per_shard=5, overwrite=True, progress=False)
"""


def test_killed_rebuild_leaves_the_old_shards_and_a_rerun_recovers(image_folder, tmp_path):
    out = tmp_path / "out"
    build_shards(image_folder, out, samples_per_shard=7, progress=False)
    before = digests(out)
    killed = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_RENAME, str(image_folder), str(out)])
    assert killed.returncode == -9
    assert digests(out) == before
    (staging,) = [p for p in out.iterdir() if p.is_dir()]  # the killed build's work, all of it
    assert [p.name for p in staging.glob("*.tar")] == ["train-000000.tar"]
    assert len(shard_samples(staging / "train-000000.tar")) == 5  # complete: tarfile read it to the end
    assert [p.name for p in staging.glob("*.tmp")] == ["train-000001.tar.tmp"]
    # The same command simply runs again and removes the leftovers.
    manifest = build_shards(image_folder, out, samples_per_shard=5, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *(s.name for s in manifest.shards)])
    assert verify_shards(out).ok


def test_manifest_load_errors_say_what_to_do(image_folder, tmp_path):
    with pytest.raises(DataError, match=r"no manifest.json in .*: build shards with `slurmvision shards build SRC"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / MANIFEST_NAME).write_text("{nope")
    with pytest.raises(DataError, match="not a valid manifest.*rebuild the shards"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 2, "classes": [], "shards": {}}))
    with pytest.raises(DataError, match="format version 2; this slurmvision reads 1"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "classes": {"a": 0}}))
    with pytest.raises(DataError, match="not a valid manifest"):
        Manifest.load(tmp_path)
    manifest = build_shards(image_folder, tmp_path / "out", splits=["train"], progress=False)
    with pytest.raises(DataError, match=r"no 'val' split \(they have: train\)"):
        manifest.shards_for("val")


@pytest.mark.parametrize(
    "name",
    [
        "../train-000000.tar",
        "/etc/passwd",
        "train/x.tar",
        "a\\b.tar",
        "",
        ".",
        "..",
        "a\nb.tar",
        "a\x00.tar",
        "a\x85.tar",
    ],
)
def test_manifest_shard_names_must_be_plain_file_names(image_folder, tmp_path, name):
    out = tmp_path / "out"
    build_shards(image_folder, out, samples_per_shard=5, splits=["train"], progress=False)
    victim = tmp_path / "train-000000.tar"
    victim.write_bytes(b"outside the shards directory")
    data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    data["shards"][1]["name"] = name
    (out / MANIFEST_NAME).write_text(json.dumps(data), encoding="utf-8")
    message = f"{re.escape(str(out / MANIFEST_NAME))}: shard 1 is named {re.escape(repr(name))}, not a plain file name"
    with pytest.raises(DataError, match=message):
        Manifest.load(out)
    with pytest.raises(DataError, match=message):
        verify_shards(out)
    build_shards(image_folder, out, samples_per_shard=5, splits=["train"], overwrite=True, progress=False)
    assert victim.read_bytes() == b"outside the shards directory"
