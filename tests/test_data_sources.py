"""What ``--data_source`` (``pathbundles.bundle.datalist``) and the deploy application's input take: one slide, a
folder, a datalist .json or a text manifest; anything else is refused naming the file."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from bundle_helpers import REPO, run_bundle
from pathbundles.bundle import datalist
from pathbundles.deploy.runtime import slide_list
from pathbundles.errors import InputError

SCANNET = REPO / "bundles" / "scannet"


@pytest.fixture()
def slides(tmp_path: Path) -> Path:
    """A folder of two tiny pyramidal TIFF slides (0.5 um/px) and an upper-case SVS name."""
    from pathbundles.writers import write_pyramid_tiff

    rng = np.random.default_rng(5)
    for name in ("b.tif", "a.SVS"):
        write_pyramid_tiff(tmp_path / name, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), mpp=0.5,
                           compression="deflate")
    return tmp_path


def test_one_slide_is_a_datalist_of_that_slide(slides: Path) -> None:
    """A slide given as --data_source was read as a JSON datalist and failed with UnicodeDecodeError."""
    assert datalist(slides / "b.tif") == [{"image": str(slides / "b.tif")}]
    assert datalist(slides / "a.SVS", split="train") == [{"image": str(slides / "a.SVS")}]  # used whole, any split
    assert datalist(os.path.relpath(slides / "b.tif")) == [{"image": str(slides / "b.tif")}]
    assert datalist(slides) == [{"image": str(slides / "a.SVS")}, {"image": str(slides / "b.tif")}]


def test_a_real_svs_is_one_slide(shared_data: Path) -> None:
    svs = shared_data / "CMU-1-Small-Region.svs"
    assert datalist(svs) == [{"image": str(svs)}]
    ome = shared_data / "openslide_os1_he_40x_crop.ome.tif"
    assert slide_list(ome, "metastasis") == [{"image": str(ome)}]


@pytest.mark.parametrize("name", ["slides.txt", "slides.lst", "slides"])
def test_a_text_manifest_lists_one_path_a_line(slides: Path, name: str) -> None:
    (slides / "lists").mkdir()
    manifest = slides / "lists" / name
    # Relative to the manifest's folder or absolute; comments, blank lines and Windows line ends are skipped.
    manifest.write_bytes(f"# cohort A\r\n../b.tif\r\n\r\n  {slides / 'a.SVS'}  \r\n".encode())
    expected = [{"image": str(slides / "b.tif")}, {"image": str(slides / "a.SVS")}]
    assert datalist(manifest) == expected
    assert slide_list(manifest, "metastasis") == expected


def test_hpf_images_for_mitosis_bundles(tmp_path: Path) -> None:
    (tmp_path / "hpf.png").write_bytes(b"")
    assert datalist(tmp_path / "hpf.png", kind="mitosis") == [{"image": str(tmp_path / "hpf.png")}]
    with pytest.raises(InputError, match=r"hpf\.png: unknown extension '\.png'; a \.png is not read as slides by "
                                         r"this bundle: expected a folder of slides, one slide \(\.tif, "):
        datalist(tmp_path / "hpf.png", kind="metastasis")


def test_what_is_no_data_source_is_refused_naming_the_file(slides: Path) -> None:
    expected = "expected a folder of slides, one slide (.tif, .tiff, .svs"
    with pytest.raises(InputError) as caught:
        datalist(slides / "absent.svs")
    assert str(caught.value).startswith(f"{slides / 'absent.svs'}: no such file or folder: {expected}")

    (slides / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(InputError) as caught:
        datalist(slides / "scan.czi")
    assert str(caught.value).startswith(f"{slides / 'scan.czi'}: unknown extension '.czi': {expected}")

    # A slide under a manifest's name (or none): its bytes are no UTF-8 text, and one NUL makes text binary.
    for name, data in (("slide.txt", (slides / "b.tif").read_bytes()), ("slide", (slides / "b.tif").read_bytes()),
                       ("nul.txt", b"a.tif\n\0\n")):
        (slides / name).write_bytes(data)
        with pytest.raises(InputError, match=rf"^{slides / name}: not a text manifest: "):
            datalist(slides / name)

    (slides / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(InputError, match=rf"^{slides / 'empty.txt'}: the manifest lists no slides"):
        datalist(slides / "empty.txt")


def test_listed_images_are_checked_up_front_only_when_asked(slides: Path) -> None:
    """A bundle run lists a missing entry and fails it alone by name; the deploy application refuses the list."""
    manifest = slides / "list.txt"
    manifest.write_text("b.tif\n\ngone.tif\n")
    assert [i["image"] for i in datalist(manifest)] == [str(slides / "b.tif"), str(slides / "gone.tif")]
    with pytest.raises(InputError) as caught:
        datalist(manifest, existing=True)
    assert str(caught.value) == f"{manifest}, line 3: {slides / 'gone.tif'}: no such file"
    (slides / "d.json").write_text(json.dumps({"items": [{"image": "b.tif"}, {"image": "gone.tif"}]}))
    with pytest.raises(InputError, match=rf"^{slides / 'd.json'}: {slides / 'gone.tif'}: no such file"):
        slide_list(slides / "d.json", "metastasis")


def test_a_cohort_lists_one_slide_or_a_manifest_as_the_bundle_does(slides: Path) -> None:
    from pathbundles.cohort import bundle_datalist

    assert bundle_datalist(SCANNET, slides / "b.tif") == [{"image": str(slides / "b.tif")}]
    (slides / "cohort.txt").write_text("a.SVS\nb.tif\n")
    assert bundle_datalist(SCANNET, slides / "cohort.txt") == [{"image": str(slides / "a.SVS")},
                                                               {"image": str(slides / "b.tif")}]


@pytest.mark.slow
def test_scannet_runs_on_one_slide_with_an_override_file_first(tmp_path: Path) -> None:
    """``--data_source slide.tif`` (it failed with UnicodeDecodeError) and a --config_file list that starts with an
    override file outside the bundle (bundle_root became that file's folder, where no weights are). MONAI's ``run``
    takes a Python list only (its ConfigWorkflow checks the comma form as one file name); the comma form, which its
    other commands take, is checked in test_bundle_support.py."""
    from pathbundles.phantom import make_phantom
    from pathbundles.writers import read_detections_csv

    data = tmp_path / "data"
    make_phantom(data, kind="metastasis", n=1, seed=7, size_px=(2048, 2048))
    (slide,) = sorted(data.glob("*.tif"))
    override = tmp_path / "site" / "override.json"
    override.parent.mkdir()
    # MONAI merges the list in order, later files winning: a file given first adds ids of its own (a site's paths
    # and settings that other ids or the command line refer to); the bundle's own ids stay the bundle's.
    override.write_text(json.dumps({"site": "lab-a"}))
    inference = SCANNET / "configs" / "inference.json"
    out = tmp_path / "out"
    result = run_bundle("run", "--config_file", f"['{override}','{inference}']", "--data_source", str(slide),
                        "--output_dir", str(out), "--lp", "8", "--num_workers", "0", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = list(csv.DictReader(open(out / "slide_scores.csv")))
    assert [row["name"] for row in rows] == [slide.stem]
    assert 0.0 <= float(rows[0]["score"]) <= 1.0
    detections = read_detections_csv(out / "detections" / f"{slide.stem}.csv")
    assert detections.ndim == 2 and detections.shape[1] == 3
    assert np.all((detections[:, 1:] >= 0) & (detections[:, 1:] < 2048))  # level-0 px of the 2048 px slide
