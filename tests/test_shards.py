"""`facevae shards build|verify|info` on real tar files: determinism across worker counts, resume, verify, and
every bad input (one-line error, exit code 2, or skipped + counted + listed)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facevae_dist.cli import main
from facevae_dist.data.masks import CELEBAMASK_HQ_PARTS
from facevae_dist.data.sources import export_synthetic_folder
from facevae_dist.data.tario import iter_tar

SMALL = ["--image-size", "36", "--shard-size", "6", "--quiet"]


def build(out, *extra):
    return main(["--quiet", "shards", "build", "--out", str(out), *SMALL[:-1], *extra])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    export_synthetic_folder(root, n=20, seed=1, label_size=64)
    return root


def copy_celeba(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_synthetic_build_is_byte_identical_for_any_worker_count(tmp_path):
    assert build(tmp_path / "w1", "--n", "40", "--workers", "1") == 0
    assert build(tmp_path / "w2", "--n", "40", "--workers", "2") == 0
    a, b = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w2")
    assert a.keys() == b.keys() and a == b
    manifest = json.loads(a["manifest.json"])
    assert manifest["total"] == 40 and json.loads(a["sizes.json"]) == {"train": 32, "val": 4, "test": 4}
    counts = [s["count"] for s in manifest["splits"]["train"]["shards"]]
    assert counts == [6, 6, 6, 6, 6, 2]  # equal-size shards, the last one holds the rest
    keys, fields = zip(*iter_tar(tmp_path / "w1" / "train" / "shard-000000.tar"))
    assert keys == tuple(f"train-{i:08d}" for i in range(6))
    assert set(fields[0]) == {"jpg", "mask.png", "json", "labels.png"}  # the synthetic source has label maps
    mask = np.asarray(Image.open(__import__("io").BytesIO(fields[0]["mask.png"])))
    assert mask.shape == (36, 36) and mask.dtype == np.uint8
    assert ((mask > 0) & (mask < 255)).any() and (mask == 255).any()  # soft edges, like the paper
    assert json.loads(fields[0]["json"])["split"] == "train"


def test_resume_rebuilds_only_incomplete_shards(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out, "--n", "40") == 0
    original = tree_bytes(out)
    (out / "train" / "shard-000002.stats.json").unlink()  # interrupted before its completion marker
    (out / "train" / "shard-000002.tar").write_bytes(b"partial")
    kept = out / "train" / "shard-000001.tar"
    os.utime(kept, (1, 1))
    assert build(out, "--n", "40") == 0
    assert kept.stat().st_mtime == 1  # complete shard untouched
    assert tree_bytes(out) == original  # the partial one rebuilt to the same bytes


def test_verify_passes_then_detects_corruption(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out, "--n", "24", "--format", "png") == 0
    assert main(["shards", "verify", str(out)]) == 0
    tar = out / "train" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1536 + 100:1536 + 160] = b"\xff" * 60  # garble the mask PNG (2nd member, data at 1536)
    tar.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["shards", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard-000001.tar: sha256 mismatch" in err and "problem(s) found" in err
    assert "sample train-00000006" in err  # the garbled sample fails to decode too


def test_info_writes_contact_sheet(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out, "--n", "20", "--fit", "center-crop") == 0
    assert main(["shards", "info", str(out), "--grid", str(tmp_path / "sheet.png"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 16, "val": 2, "test": 2}
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (8 * (72 + 2), 3 * (36 + 2))  # 20 tiles, image beside overlay


def test_celeba_layout_builds_and_truncated_image_is_skipped_counted_listed(tmp_path, celeba_root, capsys):
    root = copy_celeba(celeba_root, tmp_path / "celeba")
    jpg = root / "img_align_celeba" / "000003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated JPEG
    out = tmp_path / "s"
    assert build(out, "--source", "celeba", "--root", str(root), "--workers", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == 1 and manifest["splits"]["train"]["count"] == 15
    assert manifest["splits"]["train"]["skipped"] == 1
    errors = (out / "errors.tsv").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith("train\t000003\tcannot decode 000003.jpg")
    assert main(["shards", "verify", str(out)]) == 0


def test_missing_mask_errors_naming_file_or_is_skipped(tmp_path, celeba_root, capsys):
    root = copy_celeba(celeba_root, tmp_path / "celeba")
    (root / "mask_faceparsing" / "000005.png").unlink()
    capsys.readouterr()
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "000005.jpg: no label map" in err and "--on-missing-mask skip" in err
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root), "--on-missing-mask", "skip") == 0
    assert "000005\tno label map" in (tmp_path / "s" / "errors.tsv").read_text()
    assert json.loads((tmp_path / "s" / "sizes.json").read_text())["train"] == 15


def test_masks_dir_option(tmp_path, celeba_root):
    root = copy_celeba(celeba_root, tmp_path / "celeba")
    (root / "mask_faceparsing").rename(tmp_path / "elsewhere")
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root)) == 2
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root), "--masks", str(tmp_path / "elsewhere")) == 0


def test_malformed_partition_file_reports_line_number(tmp_path, celeba_root, capsys):
    root = copy_celeba(celeba_root, tmp_path / "celeba")
    lines = (root / "list_eval_partition.txt").read_text().splitlines()
    lines[2] = "000003.jpg train"
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "list_eval_partition.txt:3: malformed" in err


@pytest.mark.parametrize("layout", ["missing_root", "no_images", "no_partition"])
def test_missing_root_or_wrong_layout_exit_2(tmp_path, celeba_root, capsys, layout):
    root = tmp_path / "nope"
    if layout != "missing_root":
        root = copy_celeba(celeba_root, tmp_path / "celeba")
        if layout == "no_images":
            (root / "img_align_celeba").rename(root / "images")
        else:
            (root / "list_eval_partition.txt").unlink()
    capsys.readouterr()
    assert build(tmp_path / "s", "--source", "celeba", "--root", str(root)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("facevae: error:")
    expected = {"missing_root": "CelebA root not found", "no_images": "img_align_celeba",
                "no_partition": "list_eval_partition.txt"}[layout]
    assert expected in err
    assert not (tmp_path / "s").exists()  # nothing written before the layout is known to be right


def test_different_dataset_in_out_dir_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(out, "--n", "20") == 0
    capsys.readouterr()
    assert build(out, "--n", "20", "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "holds a different dataset" in err and "seed" in err and "--overwrite" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("mine")
    assert build(tmp_path / "junk", "--n", "20") == 2
    assert build(out, "--n", "20", "--seed", "5", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["seed"] == 5


def test_celebamask_hq_layout(tmp_path):
    root = tmp_path / "hq"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    (root / "CelebAMask-HQ-mask-anno" / "0").mkdir(parents=True)
    lines = ["idx         orig_idx  orig_file"]
    for idx, orig in enumerate([10, 170000, 190000, 20]):
        Image.fromarray(np.full((64, 64, 3), 40 * idx, np.uint8)).save(root / "CelebA-HQ-img" / f"{idx}.jpg")
        skin = np.zeros((32, 32), np.uint8)
        skin[8:24, 8:24] = 255
        cloth = np.zeros((32, 32), np.uint8)
        cloth[24:] = 255
        Image.fromarray(skin).save(root / "CelebAMask-HQ-mask-anno" / "0" / f"{idx:05d}_skin.png")
        Image.fromarray(cloth).save(root / "CelebAMask-HQ-mask-anno" / "0" / f"{idx:05d}_cloth.png")
        lines.append(f"{idx}          {orig}    {orig + 1}.jpg")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "s"
    assert main(["--quiet", "shards", "build", "--source", "celebamask-hq", "--root", str(root), "--out", str(out),
                 "--image-size", "18", "--shard-size", "2"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"train": 2, "val": 1, "test": 1}
    _, fields = next(iter_tar(out / "train" / "shard-000000.tar"))
    mask = np.asarray(Image.open(__import__("io").BytesIO(fields["mask.png"])))
    assert mask[8, 8] == 255 and mask[0, 0] == 0 and mask[15, 8] == 0  # skin in, cloth out
    labels = np.asarray(Image.open(__import__("io").BytesIO(fields["labels.png"])))
    assert labels[8, 8] == 1 and labels[15, 8] == 16 and labels[0, 0] == 0  # the part masks as one label map
    assert json.loads((out / "manifest.json").read_text())["labels"]["samples"] == 4
    assert json.loads(fields["json"])["celeba_index"] == 10
    assert set(CELEBAMASK_HQ_PARTS) >= {"skin", "cloth"}


def test_folder_source_with_mask_dir(tmp_path, capsys):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    (photos / "sub").mkdir(parents=True)
    masks.mkdir()
    (masks / "sub").mkdir()
    rng = np.random.default_rng(0)
    binary = np.zeros((40, 30), np.uint8)
    binary[10:30, 5:25] = 255
    label = np.zeros((40, 30), np.uint8)
    label[10:30, 5:25] = 17  # hair: face
    label[30:] = 16  # cloth: not face
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.jpg", "d.jpg"]):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photos / name)
        if name != "d.jpg":
            Image.fromarray(binary if i != 1 else label).save(masks / Path(name).with_suffix(".png"))
    args = ["--source", "folder", "--root", str(photos), "--masks", str(masks), "--split-ratios", "1,0,0"]
    capsys.readouterr()
    assert build(tmp_path / "s", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "d.jpg: no mask" in err
    assert build(tmp_path / "s", *args, "--on-missing-mask", "skip", "--image-size", "18") == 0
    assert (tmp_path / "s" / "errors.tsv").read_text().startswith("train\td.jpg\tno mask")
    samples = [s for shard in sorted((tmp_path / "s" / "train").glob("*.tar")) for s in iter_tar(shard)]
    metas = [json.loads(f["json"]) for _, f in samples]
    assert [m["source_id"] for m in metas] == ["a.jpg", "b.png", "sub/c.jpg"]
    # only the label map is stored as labels.png: a 0/255 mask has no parts to tell skin from hair
    assert ["labels.png" in fields for _, fields in samples] == [False, True, False]
    for _, fields in samples:  # both the 0/255 mask and the label map give the same face box
        mask = np.asarray(Image.open(__import__("io").BytesIO(fields["mask.png"])))
        assert mask[9, 9] == 255 and mask[0, 0] == 0 and mask[17, 9] == 0


@pytest.mark.slow
def test_folder_source_auto_masks_on_a_real_photo(tmp_path):
    pytest.importorskip("mediapipe", reason="optional extra facevae-dist[masks] not installed")
    import shutil

    import matplotlib.cbook

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), photos / "hopper.jpg")
    Image.new("RGB", (96, 96), (30, 90, 200)).save(photos / "plain.png")  # no face in it
    out = tmp_path / "s"
    assert build(out, "--source", "folder", "--root", str(photos), "--split-ratios", "1,0,0", "--image-size", "72") == 0
    assert "plain.png\tno face found" in (out / "errors.tsv").read_text()
    (_, fields), = list(iter_tar(out / "train" / "shard-000000.tar"))
    mask = np.asarray(Image.open(__import__("io").BytesIO(fields["mask.png"]))) > 127
    assert 0.1 < mask.mean() < 0.6  # a face+hair blob, not empty and not the whole frame
    # The face (upper centre) is in; the flag at the side and the uniform below the chin are out.
    assert mask[15:30, 30:45].all() and not mask[:, :12].any() and not mask[54:].any()


def test_verify_flags_unknown_and_oversized_members(tmp_path, capsys):
    import tarfile

    out = tmp_path / "s"
    assert build(out, "--n", "24") == 0
    tar = out / "train" / "shard-000000.tar"
    samples = list(iter_tar(tar))
    samples[0][1]["blob"] = b"x" * 4096  # an extra member readers do not know
    samples[1][1]["json"] = b" " * 70_000 + b"{}"  # a known one over its 64 KiB limit
    with open(tar, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        import io

        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    assert main(["shards", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"unknown member(s) {samples[0][0]}.blob (4,096 bytes): readers skip them unread" in err
    assert f"sample {samples[1][0]}: OversizedMember: member json is 70,002 bytes (limit 65,536)" in err


@pytest.mark.parametrize("name", ["manifest.json", "build.json", "sizes.json"])
def test_a_deeply_nested_or_binary_shards_file_is_one_line(tmp_path, capsys, name):
    out = tmp_path / "s"
    assert build(out, "--n", "12") == 0
    for content in (b"[" * 100_000, b'{"format": "\xff"}'):
        (out / name).write_bytes(content)
        capsys.readouterr()
        command = ["shards", "build", "--n", "12", *SMALL[:-1], "--out", str(out)] if name == "build.json" else \
            ["shards", "info", str(out)] if name == "manifest.json" else ["shards", "verify", str(out)]
        rc = main(["--quiet", *command])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("facevae: error:")]
        assert rc in (1, 2) and "Traceback" not in err and len(lines) == 1, err
        if name != "sizes.json":
            assert rc == 2 and str(out / name) in lines[0]
            assert ("nested too deeply" if content[0] == ord("[") else "not UTF-8") in lines[0]
        else:  # verify lists it among the problems
            assert "sizes.json missing or unreadable" in err


def test_a_second_build_into_the_same_folder_is_refused_naming_the_first(tmp_path, capsys):
    """Two builds into one folder raced on the same temp names, or both reported success over one set of shards."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    first = subprocess.Popen([sys.executable, "-m", "facevae_dist", "-q", "shards", "build", "--n", "20000",
                              "--image-size", "72", "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "build.json").exists():  # written once the first build holds the folder
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first build never started writing"
            time.sleep(0.2)
        assert main(["-q", "shards", "build", "--n", "20000", "--image-size", "72", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"facevae: error: another build is writing {out} (pid {first.pid}); wait for it to "
                               "finish, stop it, or choose another --out")
        assert first.poll() is None  # the first build carries on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from facevae_dist.data.shards import _lock_out_dir

    os.close(_lock_out_dir(out))  # the lock died with its holder: the next build (a resume) may take the folder


def test_an_image_size_no_model_can_train_on_is_refused_naming_the_sizes(tmp_path, capsys):
    """--image-size 37 built shards that training then refused; now the build says so first."""
    with pytest.raises(SystemExit) as exc:
        main(["shards", "build", "--image-size", "37", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'37' is not a size the model is built for; use one of 144, 72, 36, 18, 9" in err
    assert not (tmp_path / "s").exists()
