"""Real DICOM whole-slide images through a bundle: the Camelyon DICOM instances of ../shared/data (JPEG 2000 and
JPEG YBR_FULL_422 frames) run through scannet's own inference workflow, as users run it.

The files are 28.97 um/px thumbnails: at the bundle's scan resolution a run would upsample them 58 times (a
100k px wide image), so the datalist states 0.5 um/px for them (the documented ``mpp`` item key). The outputs then
show that the DICOM path reads, names and places real DICOM pixels through a bundle; they are no result on tissue
(and the weights are demo weights). The DICOMized phantoms of tests/test_deploy.py cover real geometry.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import REPO, run_bundle

#: The series of the real JPEG instance: it states no ContainerIdentifier, so its outputs go by the series UID.
NO_CONTAINER_SERIES = "1.3.6.1.4.1.11129.5.7.0.1.517182092386.24422120.1688792467737634"
#: file -> (the outputs' name: ContainerIdentifier, else series UID; level-0 width, height in px)
REAL = {"multi_frame_jpeg2000_camelyon_challenge_image.dcm": ("GO-1692287590758-1-A-0", 1696, 812),
        "multi_frame_jpeg_camelyon_challenge_image.dcm": (NO_CONTAINER_SERIES, 1152, 700)}
STATED_MPP = 0.5


@pytest.mark.slow
def test_real_dicom_slides_run_through_scannet(shared_data: Path, tmp_path: Path) -> None:
    import tifffile

    from pathbundles.bundle_runner import bundle_info
    from pathbundles.dicom_writers import export_slide_results
    from pathbundles.errors import InputError
    from pathbundles.writers import read_detections_geojson, read_pyramid_fields
    from pathbundles.wsi import open_slide

    folder = shared_data / "dicom_camelyon_thumbnails"
    datalist = tmp_path / "dicom.json"
    datalist.write_text(json.dumps({"items": [{"image": str(folder / f), "mpp": STATED_MPP} for f in REAL]}))
    out = tmp_path / "out"
    done = run_bundle("run", "--config_file", str(REPO / "bundles" / "scannet" / "configs" / "inference.json"),
                      "--data_source", str(datalist), "--output_dir", str(out), "--lp", "8", "--num_workers", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "slide_scores.csv", newline="") as f:
        scores = {row["name"]: row for row in csv.DictReader(f)}
    # Named by the series' container identifier (else its UID), never by an instance UID or the file name.
    assert sorted(scores) == sorted(name for name, _, _ in REAL.values())
    for file, (name, width, height) in REAL.items():
        fields = read_pyramid_fields(out / "maps" / f"{name}.tif")
        map_mpp = float(fields["mpp"])
        # The map covers the slide at the stated resolution: ceil(level-0 size * 0.5 / map mpp) pixels a side.
        assert tifffile.imread(out / "maps" / f"{name}.tif", level=0).shape[:2] == (
            math.ceil(height * STATED_MPP / map_mpp), math.ceil(width * STATED_MPP / map_mpp))
        detections = read_detections_geojson(out / "detections" / f"{name}.geojson")
        assert int(scores[name]["n_detections"]) == len(detections)
        assert np.all((detections[:, 1:] >= 0) & (detections[:, 1:] <= [width, height]))
        # The DICOM results are not written for a run that overrode the source's pixel spacing: they would be
        # placed at 0.5 um/px on a 28.97 um/px image. The error names the slide and both resolutions.
        with open_slide(folder / file, mpp=STATED_MPP) as slide:
            assert slide.backend == "dicom" and slide.dimensions == (width, height)
            with pytest.raises(InputError, match=rf"slide {name}: the run read the slide at level-0 0.5 um/px, the "
                                                 r"DICOM source has 28.969 um/px"):
                export_slide_results(out, name, slide.source_datasets(), bundle_info(REPO / "bundles" / "scannet"))
    assert not (out / "dicom").exists()
