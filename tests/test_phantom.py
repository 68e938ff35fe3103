"""Tests of the phantom generators: determinism, file formats, annotation/mask agreement, lesion classes, pixels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from pathbundles import phantom
from pathbundles.annotations import rasterize, read_annotations, read_points_csv


@pytest.fixture(scope="session")
def metastasis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Four 1536-px slides (two tumour, two normal) at 0.5 um/px."""
    out = tmp_path_factory.mktemp("metastasis")
    path = phantom.make_metastasis_dataset(out, n=4, seed=3, size_px=1536)
    return out, json.loads(path.read_text())


@pytest.fixture(scope="session")
def mitosis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mitosis")
    path = phantom.make_mitosis_dataset(out, n=4, seed=1, size_px=400)
    return out, json.loads(path.read_text())


@pytest.fixture(scope="session")
def multiclass(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("multiclass")
    path = phantom.make_multiclass_dataset(out, n=1, seed=2, size_px=2048)
    return out, json.loads(path.read_text())


def _digest(folder: Path) -> dict[str, str]:
    """Hash of every output file; TIFFs by their level-0 pixels (the container holds nothing random either)."""
    digests = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            data = tifffile.imread(f, key=0).tobytes() if f.suffix == ".tif" else f.read_bytes()
            digests[str(f.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.mark.parametrize("kind, size", [("metastasis", 1024), ("mitosis", 300), ("multiclass", 1024)])
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, kind: str, size: int) -> None:
    a = _digest(phantom.make_phantom(tmp_path / "a", kind=kind, n=1, seed=5, size_px=size).parent)
    b = _digest(phantom.make_phantom(tmp_path / "b", kind=kind, n=1, seed=5, size_px=size).parent)
    c = _digest(phantom.make_phantom(tmp_path / "c", kind=kind, n=1, seed=6, size_px=size).parent)
    assert a == b
    assert len(a) >= 3 and not any(part.startswith(".") for name in a for part in Path(name).parts)  # no temporaries
    images = [name for name in a if name.endswith((".tif", ".png"))]
    assert images and all(a[name] != c[name] for name in images)


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="phantom kind"):
        phantom.make_phantom(tmp_path, kind="lymphoma")
    assert not any(tmp_path.iterdir())


def test_pyramid_tiff_layout(metastasis: tuple[Path, dict]) -> None:
    out, ds = metastasis
    assert ds["level0_mpp"] == 0.5 and ds["mask_downsample"] == 16
    path = out / ds["items"][0]["image"]
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert [p.shape[:2] for p in pages] == [(1536, 1536), (384, 384), (96, 96)]  # step 4 until <= 256
        for k, page in enumerate(pages):
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert int(page.subfiletype) == (1 if k else 0)
            x_res = page.tags["XResolution"].value
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            assert 10_000 * x_res[1] / x_res[0] == pytest.approx(0.5 * 1536 / page.shape[1])
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count == 3
        assert slide.level_downsamples[1] == pytest.approx(4.0)


def test_lesions_inside_tissue_and_masks_match_xml(metastasis: tuple[Path, dict]) -> None:
    out, ds = metastasis
    tumour_items = [it for it in ds["items"] if it["label"] == 1]
    assert [it["label"] for it in ds["items"]] == [1, 0, 1, 0]
    for item in ds["items"]:
        tissue = np.asarray(Image.open(out / item["tissue"])) > 0
        assert 0.3 < tissue.mean() < 0.7
        if item["label"] == 0:
            assert item["mask"] is None and item["annotation"] is None and item["lesions"] == []
    for item in tumour_items:
        tissue = np.asarray(Image.open(out / item["tissue"])) > 0
        mask = np.asarray(Image.open(out / item["mask"]))
        assert set(np.unique(mask)) == {0, 255}
        assert not (mask.astype(bool) & ~tissue).any()
        annotations = read_annotations(out / item["annotation"])
        assert np.array_equal(rasterize(annotations, mask.shape, 16) * np.uint8(255), mask)
        tumour_polygons = [a for a in annotations if a.group == "_0"]
        assert len(tumour_polygons) == len(item["lesions"])
        for polygon, lesion in zip(tumour_polygons, item["lesions"]):
            d = polygon.xy[:, None] - polygon.xy[None]
            assert np.sqrt((d ** 2).sum(-1)).max() * 0.5 == pytest.approx(lesion["diameter_um"], abs=0.1)
            assert lesion["kind"] == phantom.lesion_kind(lesion["diameter_um"])
        assert sum(lesion["kind"] == "itc" for lesion in item["lesions"]) >= 1


def test_full_size_slide_has_every_lesion_class() -> None:
    """On the default 8192-px slide the lesions cover the Camelyon16 classes (planned only, not rendered)."""
    plan = phantom._plan_metastasis_slide(phantom._rng(0, "metastasis", 0), (8192, 8192), 0.5, True)
    kinds = [lesion["kind"] for lesion in plan.lesions]
    assert kinds[0] == "macro" and kinds.count("macro") == 1
    assert 1 <= kinds.count("micro") <= 2 and 1 <= kinds.count("itc") <= 3
    for lesion in plan.lesions:
        if lesion["kind"] == "itc":
            assert lesion["diameter_um"] < 200
    tissue = plan.tissue
    for a in plan.tumour:
        assert any(phantom._inside(a.xy, t.xy).all() for t in tissue)


def _patches(out: Path, item: dict, tumour: bool, n: int = 12) -> list[np.ndarray]:
    """244-px level-0 patches wholly inside tumour (or wholly inside non-tumour tissue)."""
    image = tifffile.imread(out / item["image"], key=0)
    tissue = np.asarray(Image.open(out / item["tissue"])) > 0
    mask = (np.asarray(Image.open(out / item["mask"])) > 0) if item["mask"] else np.zeros_like(tissue)
    region = mask if tumour else tissue & ~ndi.binary_dilation(mask, iterations=16)
    rr, cc = np.nonzero(ndi.binary_erosion(region, iterations=8))
    pick = np.random.default_rng(0).choice(len(rr), min(n, len(rr)), replace=False)
    return [image[rr[k] * 16 - 114:rr[k] * 16 + 130, cc[k] * 16 - 114:cc[k] * 16 + 130] for k in pick]


def _nucleus_area(patch: np.ndarray) -> float:
    """Median area (px) of dark blobs: a crude nucleus-size statistic that ignores stain strength."""
    grey = patch.astype(np.float32).mean(axis=2)
    labels, _ = ndi.label(ndi.binary_opening(grey < np.percentile(grey, 35)))
    return float(np.median(np.bincount(labels.ravel())[1:]))


def test_tumour_differs_by_texture_not_by_mean_colour(metastasis: tuple[Path, dict]) -> None:
    out, ds = metastasis
    tumour = [p for it in ds["items"] if it["label"] for p in _patches(out, it, True)]
    normal = [p for it in ds["items"] for p in _patches(out, it, False)]
    assert len(tumour) >= 12 and len(normal) >= 24
    # Texture: carcinoma nuclei are clearly larger than lymphocytes in every patch set.
    assert np.median([_nucleus_area(p) for p in tumour]) > 1.5 * np.median([_nucleus_area(p) for p in normal])
    # Colour: the per-slide stain spread makes tumour and normal mean colours overlap in every channel.
    mean_t = np.array([p.reshape(-1, 3).mean(0) for p in tumour])
    mean_n = np.array([p.reshape(-1, 3).mean(0) for p in normal])
    assert (np.maximum(mean_t.min(0), mean_n.min(0)) < np.minimum(mean_t.max(0), mean_n.max(0))).all()


def test_mitosis_centroids_lie_on_dark_figures(mitosis: tuple[Path, dict]) -> None:
    out, ds = mitosis
    counts = [it["n_mitoses"] for it in ds["items"]]
    assert 0 in counts and all(0 <= c <= 6 for c in counts) and sum(counts) > 0
    for item in ds["items"]:
        image = np.asarray(Image.open(out / item["image"]))
        assert image.shape == (400, 400, 3) and image.dtype == np.uint8
        xy, scores = read_points_csv(out / item["centroids"], order="xy")
        assert scores is None and len(xy) == item["n_mitoses"]
        grey = image.astype(np.float32).mean(axis=2)
        dark = grey < np.percentile(grey, 3)
        yy, xx = np.mgrid[:400, :400]
        for x, y in xy:
            near = (xx - x) ** 2 + (yy - y) ** 2 <= 20 ** 2  # 5 um at 0.25 um/px
            assert dark[near].sum() >= 40, (item["image"], x, y)


def test_multiclass_labels_and_partial_subset(multiclass: tuple[Path, dict]) -> None:
    out, ds = multiclass
    item = ds["items"][0]
    assert item["classes"] == {str(k): v for k, v in phantom.MULTICLASS_CLASSES.items()}
    labels = np.asarray(Image.open(out / item["labels"]))
    partial = np.asarray(Image.open(out / item["partial_labels"]))
    assert labels.shape == partial.shape == (512, 512)
    assert set(np.unique(labels)) == {1, 2, 3, 4, 5, 6}
    annotated = partial > 0
    assert 0 < annotated.mean() < 0.5
    assert (partial[annotated] == labels[annotated]).all()
    assert set(np.unique(partial[annotated])) == {1, 2, 3, 4, 5, 6}
    polygons = read_annotations(out / item["annotation"])
    assert {a.label for a in polygons} == set(phantom.MULTICLASS_CLASSES.values())
    with tifffile.TiffFile(out / item["image"]) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(2048, 2048), (1024, 1024), (512, 512), (256, 256)]


def test_backends_read_identical_phantom_pixels(metastasis: tuple[Path, dict]) -> None:
    """OpenSlide and the tile-only tifffile reader return the same pixels of a phantom slide, at level 0 and at a
    resampled mpp (the phantom has 4x levels, so 1.0 um/px is resampled from level 0)."""
    from pathbundles.wsi import open_slide

    root, doc = metastasis
    path = root / doc["items"][0]["image"]
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.level_dimensions == b.level_dimensions and a.level_downsamples == b.level_downsamples
        for xy, size, mpp in [((300, 200), (512, 384), 0.5), ((0, 0), (300, 300), 1.0), ((1400, 1400), (256, 256), 0.5)]:
            pa, pb = a.read_region(xy, size, mpp).astype(int), b.read_region(xy, size, mpp).astype(int)
            assert pa.shape == pb.shape == (size[1], size[0], 3)
            assert np.abs(pa - pb).mean() < 1.0
