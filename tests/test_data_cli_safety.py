"""python -m boxloss.data and the exporters with a user's files in the way: existing output folders are refused
unless overwriting is asked for, exports are atomic, paths that are files are clear errors, and broken input files
(truncated images, garbage RLE, malformed JSON or XML) print one message naming the file and exit 2 without a
traceback.  A COCO polygon lying outside its image is loaded but warned about."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import boxloss.data.coco as coco_module
import boxloss.data.voc as voc_module
from boxloss.data import COCOBoxDataset, SyntheticConfig, VOCBoxDataset, export_coco, export_voc, generate_sample
from boxloss.data.__main__ import main
from boxloss.data.coco import _compressed_rle_runs, decode_segmentation, encode_rle
from data_builders import coco_folder, edit_json, voc_folder

TINY = ["--size", "24x28", "--train", "2", "--val", "1", "--test", "1", "--seed", "5", "--no-cache"]
CFG = SyntheticConfig(image_size=(24, 28), seed=5)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (and root itself) with the bytes of files (None for folders)."""
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _no_partial_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


def _export(fmt: str, out: Path, *extra: str) -> int:
    return main(["export", "--format", fmt, "--out", str(out), *TINY, "--image-format", "png", *extra])


def _load(fmt: str, out: Path, split: str = "train"):
    if fmt == "voc":
        return VOCBoxDataset(out, split)
    return COCOBoxDataset(out / "annotations" / f"instances_{split}.json", out / split)


def _user_folder(kind: str, root: Path) -> None:
    """Something a user already keeps at the output path."""
    if kind == "voc root":
        voc_folder(root)
    elif kind == "coco root":
        coco_folder(root)
    elif kind == "one file":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    elif kind == "nested file":
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "train.txt").write_text("my_image\n")
    elif kind == "hidden file":
        root.mkdir()
        (root / ".keep").write_text("")


FOLDERS_WITH_FILES = ["voc root", "coco root", "one file", "nested file", "hidden file"]


# --------------------------------------------------------------------------- refusing and overwriting


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("kind", FOLDERS_WITH_FILES)
def test_export_refuses_a_folder_with_files(tmp_path, capsys, fmt, kind):
    out = tmp_path / "out"
    _user_folder(kind, out)
    before = _snapshot(out)
    assert _export(fmt, out) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and str(out) in err and "Traceback" not in err
    assert _snapshot(out) == before
    _no_partial_left(tmp_path)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("exporter", [export_voc, export_coco])
def test_library_exporters_refuse_too(tmp_path, fmt, exporter):
    out = tmp_path / "out"
    _user_folder("voc root" if fmt == "voc" else "coco root", out)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=f"{exporter.__name__}: the output folder .* is not empty"):
        exporter({"train": [generate_sample(CFG, "train", 0)]}, out, CFG.class_names)
    assert _snapshot(out) == before


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("kind", FOLDERS_WITH_FILES)
def test_overwrite_replaces_the_exported_files_and_keeps_the_others(tmp_path, capsys, fmt, kind):
    out = tmp_path / "out"
    _user_folder(kind, out)
    (out / "mine.txt").write_text("keep me")
    assert _export(fmt, out, "--overwrite") == 0
    assert (out / "mine.txt").read_text() == "keep me"
    ds = _load(fmt, out)
    assert len(ds) == 2 and ds[0].image_id == "train_000000"
    _no_partial_left(tmp_path)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("how", ["absent", "empty folder", "missing parents", "link to an empty folder"])
def test_export_into_a_new_or_empty_folder(tmp_path, capsys, fmt, how):
    out = tmp_path / "out"
    if how == "empty folder":
        out.mkdir()
    elif how == "missing parents":
        out = tmp_path / "a" / "b" / "out"
    elif how == "link to an empty folder":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    assert _export(fmt, out) == 0
    assert len(_load(fmt, out)) == 2 and len(_load(fmt, out, "val")) == 1
    if how == "link to an empty folder":
        assert out.is_symlink() and (tmp_path / "real" / ("ImageSets" if fmt == "voc" else "annotations")).is_dir()
    _no_partial_left(out.parent)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys, fmt, where):
    f = tmp_path / "file"
    f.write_text("precious")
    out = f if where == "out" else f / "sub"
    assert _export(fmt, out) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and str(f) in err and "Traceback" not in err
    assert f.read_text() == "precious"


@pytest.mark.parametrize("command", ["generate", "stats"])
@pytest.mark.parametrize("where", ["cache", "parent"])
def test_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys, command, where):
    f = tmp_path / "file"
    f.write_text("precious")
    cache = f if where == "cache" else f / "sub"
    argv = [command, "--size", "24x28", "--train", "2", "--val", "1", "--test", "1", "--cache-dir", str(cache)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and str(f) in err and "--no-cache" in err and "Traceback" not in err
    assert f.read_text() == "precious"


# --------------------------------------------------------------------------- atomic writes


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("fmt", ["voc", "coco"])
@pytest.mark.parametrize("kind", ["absent", "empty folder", "voc root", "coco root"])
@pytest.mark.parametrize("exc", [_Interrupt, KeyboardInterrupt, OSError])
def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, fmt, kind, exc):
    out = tmp_path / "out"
    if kind == "empty folder":
        out.mkdir()
    elif kind != "absent":
        _user_folder(kind, out)
    before = _snapshot(out)
    module = voc_module if fmt == "voc" else coco_module
    written = []
    real = module.write_image

    def failing(path, image, quality=95):
        if len(written) == 2:
            raise exc("disk full")
        written.append(path)
        real(path, image, quality)

    monkeypatch.setattr(module, "write_image", failing)
    samples = {"train": [generate_sample(CFG, "train", i) for i in range(4)]}
    exporter = export_voc if fmt == "voc" else export_coco
    with pytest.raises(exc):
        exporter(samples, out, CFG.class_names, overwrite=True)
    assert _snapshot(out) == before
    _no_partial_left(tmp_path)


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_killed_export_leaves_no_dataset(tmp_path, fmt):
    """A process killed mid-export (no clean-up runs) leaves only a hidden staging folder, never the target."""
    out = tmp_path / "out"
    code = (
        "import os, boxloss.data.voc as v, boxloss.data.coco as c\n"
        "from boxloss.data.__main__ import main\n"
        "n = [0]\n"
        f"m = {'v' if fmt == 'voc' else 'c'}\n"
        "real = m.write_image\n"
        "def die(path, image, quality=95):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3: os._exit(9)\n"
        "    real(path, image, quality)\n"
        "m.write_image = die\n"
        f"main({['export', '--format', fmt, '--out', str(out), *TINY]!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(".out.partial-")
    with pytest.raises(FileNotFoundError):
        _load(fmt, out)


# --------------------------------------------------------------------------- bad input files


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _bad_voc(root: Path, what: str) -> tuple[list[str], Path]:
    voc_folder(root, image_format="jpg")
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    if what == "truncated jpeg":
        bad = root / "JPEGImages" / f"{ids[1]}.jpg"
        _truncate(bad)
    elif what == "truncated mask":
        bad = root / "SegmentationClass" / f"{ids[0]}.png"
        _truncate(bad, 0.6)
    elif what == "garbage jpeg":
        bad = root / "JPEGImages" / f"{ids[0]}.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif what == "malformed xml":
        bad = root / "Annotations" / f"{ids[0]}.xml"
        bad.write_text("<annotation><object>")
    elif what == "missing image":
        bad = root / "JPEGImages" / f"{ids[0]}.jpg"
        bad.unlink()
    else:
        raise AssertionError(what)
    return ["stats", "--voc", str(root)], bad


def _bad_coco(root: Path, what: str) -> tuple[list[str], Path]:
    _, ann, images = coco_folder(root, image_format="jpg")
    argv = ["stats", "--coco", str(ann), "--images", str(images)]
    if what == "truncated jpeg":
        bad = sorted(images.iterdir())[1]
        _truncate(bad)
        return argv, bad
    if what == "malformed json":
        ann.write_text('{"images": [')
        return argv, ann
    counts = {"garbage rle": "garbage!!", "empty rle": "", "short rle": "0", "negative rle": "1:"}[what]

    def edit(doc):
        doc["annotations"][0]["segmentation"]["counts"] = counts

    edit_json(ann, edit)
    return argv, ann


BAD_FILES = [("voc", w) for w in ("truncated jpeg", "truncated mask", "garbage jpeg", "malformed xml", "missing image")]
BAD_FILES += [
    ("coco", w) for w in ("truncated jpeg", "malformed json", "garbage rle", "empty rle", "short rle", "negative rle")
]


@pytest.mark.parametrize("fmt, what", BAD_FILES)
def test_bad_files_print_one_message_naming_the_file_and_exit_2(tmp_path, capsys, fmt, what):
    argv, bad = (_bad_voc if fmt == "voc" else _bad_coco)(tmp_path / "data", what)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m boxloss.data stats: error: ") and str(bad) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_file_exit_status_of_the_process(tmp_path):
    argv, bad = _bad_coco(tmp_path / "data", "garbage rle")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-m", "boxloss.data", *argv], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_garbage_rle_is_skipped_in_skip_mode(tmp_path, capsys):
    argv, _ = _bad_coco(tmp_path / "data", "garbage rle")
    with pytest.warns(UserWarning, match="skipped 1 x malformed segmentation"):
        assert main([*argv, "--on-error", "skip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 1


# --------------------------------------------------------------------------- COCO RLE strings


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31), st.floats(0, 1))
def test_fuzz_rle_runs_of_encoded_masks(h, w, seed, density):
    region = np.random.default_rng(seed).random((h, w)) < density
    rle = encode_rle(region)
    runs = _compressed_rle_runs(rle["counts"])
    flat = region.ravel(order="F")
    expanded = np.concatenate([np.full(r, i % 2 == 1, bool) for i, r in enumerate(runs)]) if runs else flat[:0]
    np.testing.assert_array_equal(expanded, flat)


@given(st.text(alphabet=[chr(c) for c in range(40, 115)], max_size=12), st.integers(1, 5), st.integers(1, 5))
def test_fuzz_rle_strings_decode_or_are_rejected(counts, h, w):
    """A string the loader accepts decodes to exactly the pixels its runs say; any other is rejected by
    _segmentation_problem before pycocotools sees it."""
    seg = {"size": [h, w], "counts": counts}
    problem = coco_module._segmentation_problem(seg, h, w)
    runs = _compressed_rle_runs(counts)
    valid = runs is not None and all(r >= 0 for r in runs) and sum(runs) == h * w
    assert (problem is None) == valid
    if valid:
        flat = np.concatenate([np.full(r, i % 2 == 1, bool) for i, r in enumerate(runs)])
        np.testing.assert_array_equal(decode_segmentation(seg, h, w).ravel(order="F"), flat)


# --------------------------------------------------------------------------- polygons outside the image


def _polygon_doc(tmp_path: Path, polygon) -> tuple[Path, Path]:
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0, "segmentation": [polygon]}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return tmp_path / "ann.json", tmp_path


@pytest.mark.parametrize(
    "polygon",
    [
        [40, 40, 50, 40, 50, 50, 40, 50],  # beyond the bottom-right corner
        [-20, 4, -10, 4, -10, 14, -20, 14],  # left of the image
        [4, 32, 14, 32, 14, 40],  # on and below the bottom edge
    ],
)
def test_polygon_outside_the_image_is_loaded_and_warned_about(tmp_path, capsys, polygon):
    ann, images = _polygon_doc(tmp_path, polygon)
    with pytest.warns(UserWarning, match="kept but suspicious 1 x segmentation outside the image"):
        ds = COCOBoxDataset(ann, images)
    assert ds.noticed["segmentation outside the image"] == 1 and ds[0].num_boxes == 1 and not ds[0].mask.any()
    with pytest.warns(UserWarning, match="segmentation outside the image"):
        assert main(["stats", "--coco", str(ann), "--images", str(images), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["boxes_without_object_pixels"] == 1
    assert "1 box(es) hold no pixel of their class" in captured.err and "image a" in captured.err


def test_polygon_inside_the_image_is_not_warned_about(tmp_path, capsys, recwarn):
    ann, images = _polygon_doc(tmp_path, [4, 4, 14, 4, 14, 14, 4, 14])
    assert main(["stats", "--coco", str(ann), "--images", str(images), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["boxes_without_object_pixels"] == 0 and captured.err == ""
    assert not [w for w in recwarn if "suspicious" in str(w.message)]


# --------------------------------------------------------------------------- fuzzing existing output paths

_STATES = ["absent", "empty folder", "one file", "nested file", "voc root", "file", "under a file", "link to empty"]


def _make_state(state: str, out: Path) -> None:
    if state == "empty folder":
        out.mkdir()
    elif state in ("one file", "nested file", "voc root"):
        _user_folder(state, out)
    elif state == "file":
        out.write_text("precious")
    elif state == "under a file":
        out.parent.mkdir()
        (out.parent / "blocker").write_text("precious")
    elif state == "link to empty":
        (out.parent / "real").mkdir()
        out.symlink_to(out.parent / "real")


@settings(max_examples=40)
@given(st.sampled_from(_STATES), st.booleans(), st.sampled_from(["voc", "coco"]))
def test_fuzz_existing_output_paths(state, overwrite, fmt):
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        out = base / "p" / "blocker" / "out" if state == "under a file" else base / "out"
        if state == "under a file":
            (base / "p").mkdir()
            (base / "p" / "blocker").write_text("precious")
        else:
            _make_state(state, out)
        before = {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(base.rglob("*"))}
        with open(os.devnull, "w") as null:
            saved = sys.stderr
            sys.stderr = null
            try:
                rc = _export(fmt, out, *(["--overwrite"] if overwrite else []))
            finally:
                sys.stderr = saved
        has_files = state in ("one file", "nested file", "voc root")
        should_write = state in ("absent", "empty folder", "link to empty") or (has_files and overwrite)
        assert rc == (0 if should_write else 2)
        after = {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(base.rglob("*"))}
        if should_write:
            assert len(_load(fmt, out)) == 2
            for path, data in before.items():  # the user's files the export does not write are untouched
                if data is not None and "ImageSets" not in path and "annotations" not in path:
                    if not any(part in path for part in ("JPEGImages", "Annotations", "SegmentationClass", "train")):
                        assert after[path] == data
        else:
            assert after == before
        assert not [p for p in base.rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_overwrite_with_a_folder_in_the_way_moves_nothing(tmp_path, capsys, fmt):
    """A folder where the export writes a file (or a file where it needs a folder) is found before any file moves."""
    out = tmp_path / "out"
    _user_folder("one file", out)
    if fmt == "voc":
        (out / "JPEGImages").write_text("a file where a folder belongs")
    else:
        (out / "annotations" / "instances_train.json").mkdir(parents=True)
    before = _snapshot(out)
    assert _export(fmt, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "in the way of the export" in err and "Traceback" not in err
    assert _snapshot(out) == before
    _no_partial_left(tmp_path)
