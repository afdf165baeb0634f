"""python -m boxloss.data: generate, stats and export, and what importing boxloss.data pulls in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from boxloss.data import COCOBoxDataset, SyntheticBoxDataset, SyntheticConfig, VOCBoxDataset
from boxloss.data.__main__ import main
from data_builders import assert_same_sample

SMALL = ["--size", "40x48", "--train", "5", "--val", "2", "--test", "2", "--seed", "3"]


def test_generate_caches_and_reports_beside_voc(tmp_path, capsys):
    assert main(["generate", *SMALL, "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 5 images" in out and "test: 2 images" in out and str(tmp_path) in out
    assert "PASCAL VOC 2012 (approx.)" in out and "boxes per image" in out and "syn06" in out
    key = SyntheticConfig(image_size=(40, 48), seed=3).key()
    assert (tmp_path / key / "train-5.images.npy").is_file()


@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_export_then_load_gives_the_generated_data(tmp_path, capsys, fmt):
    out = tmp_path / fmt
    assert (
        main(
            [
                "export",
                "--format",
                fmt,
                "--out",
                str(out),
                *SMALL,
                "--no-cache",
                "--image-format",
                "png",
                "--splits",
                "train,val",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    config = SyntheticConfig(image_size=(40, 48), seed=3)
    for split, n in (("train", 5), ("val", 2)):
        ref = SyntheticBoxDataset(split, n, config, cache=False)
        ds = (
            VOCBoxDataset(out, split)
            if fmt == "voc"
            else COCOBoxDataset(out / "annotations" / f"instances_{split}.json", out / split)
        )
        assert len(ds) == n
        for i in range(n):
            assert_same_sample(ds[i], ref[i])
    assert not (out / "test").exists() and not (out / "ImageSets" / "Segmentation" / "test.txt").exists()


def test_stats_of_synthetic_voc_and_coco_folders(tmp_path, capsys):
    main(["export", "--format", "voc", "--out", str(tmp_path / "voc"), *SMALL, "--no-cache"])
    main(["export", "--format", "coco", "--out", str(tmp_path / "coco"), *SMALL, "--no-cache"])
    capsys.readouterr()
    main(["stats", *SMALL, "--no-cache", "--json"])
    synthetic = json.loads(capsys.readouterr().out)
    main(["stats", "--voc", str(tmp_path / "voc"), "--json"])
    voc = json.loads(capsys.readouterr().out)
    main(
        [
            "stats",
            "--coco",
            str(tmp_path / "coco" / "annotations" / "instances_train.json"),
            "--images",
            str(tmp_path / "coco" / "train"),
            "--json",
        ]
    )
    coco = json.loads(capsys.readouterr().out)
    assert synthetic == voc == coco  # masks and boxes survive both layouts exactly
    assert synthetic["num_images"] == 5
    main(["stats", "--voc", str(tmp_path / "voc"), "--voc-split", "val"])
    assert "VOC val" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--size", "0x"],
        ["generate", "--splits", "train,dev"],
        ["export", "--format", "yolo", "--out", "x"],
        ["export", "--format", "voc"],
        ["stats", "--coco", "a.json"],
        [],
    ],
)
def test_bad_arguments_exit_with_an_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0


def test_module_help_and_imports_stay_light():
    code = (
        "import sys, runpy, boxloss.data\n"
        "print('HEAVY', sorted(m for m in ('cv2', 'pycocotools', 'matplotlib') if m in sys.modules))\n"
        "sys.argv = ['boxloss.data', '--help']\n"
        "runpy.run_module('boxloss.data', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert "generate" in r.stdout and "export" in r.stdout and "stats" in r.stdout
