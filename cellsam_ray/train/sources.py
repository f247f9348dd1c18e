"""Where labelled images for training come from, each as ``LabelledImage``s (``train.data``), then subsampled:

- OME-Zarr slides with a label image are cut into windows by the whole-slide pipeline's own planning
  and window reader (slide-wide intensity scaling, tissue mask, background padding at borders);
- a folder of image + label pairs is read as ``segment-image`` reads an image (optionally with the
  library normalisation, its default);
- synthetic tissue is drawn in named styles (``train.synthetic``), or written as OME-Zarr slides and then
  read like any slide.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cellsam_ray.errors import UserError
from cellsam_ray.model.preprocess import format_image_shape, normalize_image
from cellsam_ray.train.data import DataSpec, LabelledImage
from cellsam_ray.train.synthetic import style_windows

LABEL_SUFFIX = "_labels"
"""A folder pair is ``NAME.ext`` (the image) and ``NAME_labels.ext`` (its cells)."""
IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def load_images(spec: DataSpec, window: int) -> list[LabelledImage]:
    """Every labelled image the spec names (slides cut into ``window``-pixel windows), then subsampled."""
    images: list[LabelledImage] = []
    for url in list(spec.slides) + synthetic_slides(spec):
        images += slide_windows(url, spec, window)
    if spec.synthetic_styles:
        images += style_windows(spec.synthetic_styles, spec.synthetic_seeds, spec.synthetic_size, window,
                                seed=spec.tile_seed)
    if spec.folder:
        images += folder_images(spec.folder, normalize=spec.normalize)
    if not images:
        raise UserError("the training data holds no labelled tiles")
    if spec.max_tiles is not None and spec.max_tiles < len(images):
        # Prefer tiles with cells: a few-shot set of empty tiles teaches nothing.
        rng = np.random.default_rng(spec.tile_seed)
        with_cells = [i for i, im in enumerate(images) if im.labels.any()]
        others = [i for i in range(len(images)) if not images[i].labels.any()]
        order = list(rng.permutation(with_cells)) + list(rng.permutation(others))
        images = [images[i] for i in sorted(order[: spec.max_tiles])]
    return images


def synthetic_slides(spec: DataSpec) -> list[str]:
    """Write the spec's synthetic slides (3 channels: DAPI, E-cadherin, Pan-Cytokeratin); their URLs."""
    from cellsam_ray.synth import write_synthetic_slide

    urls = []
    for seed in [] if spec.synthetic_styles else spec.synthetic_seeds:
        url = str(Path(spec.synthetic_dir, f"synthetic-{seed}-{spec.synthetic_size}.ome.zarr"))
        write_synthetic_slide(url, size=(spec.synthetic_size,) * 2, channels=3, seed=seed, chunk=256)
        urls.append(url)
    return urls


def slide_windows(url: str, spec: DataSpec, window: int) -> list[LabelledImage]:
    """The slide's tissue windows of ``window`` pixels, read as the segment pipeline reads them.

    Windows step by ``spec.stride`` (overlapping when smaller than the window); the labels come from
    ``labels/<spec.label>`` at the same level, zero past the borders like the image.
    """
    from cellsam_ray.driver.windows import plan_run
    from cellsam_ray.io.ngff import open_image
    from cellsam_ray.model.cellsam import cellsam_layout
    from cellsam_ray.pipeline.pixels import level_selection
    from cellsam_ray.pipeline.source import read_window
    from cellsam_ray.spec import SegmentSpec

    stride = spec.stride or window
    if stride > window or (window - stride) % 2:
        raise UserError(f"stride {stride} must be at most the window ({window}) and differ from it by an even number")
    # Planned as a run of the ground-truth oracle on the training label: its windows are exactly what training
    # needs (the plan only checks that the oracle takes these options; nothing is segmented).
    plan = plan_run(SegmentSpec(
        input=url, nuclear=spec.nuclear, whole_cell=spec.whole_cell, level=spec.level, tile=stride,
        halo=(window - stride) // 2, chunk=stride, band=0, storage_options=spec.storage_options,
        segmenter="cellsam_ray.testing.oracle:GroundTruthSegmenter", segmenter_options=dict(labels=url),
    ))
    truth = open_image(url, spec.storage_options).label(spec.label).array(plan.level)
    label_axes = tuple(a for a in plan.axes if a != "c")
    images = []
    for tile in plan.tiles:
        wy0, wx0 = tile.origin
        y0, x0 = max(wy0, 0), max(wx0, 0)
        y1, x1 = min(wy0 + window, plan.grid.height), min(wx0 + window, plan.grid.width)
        selection = level_selection(label_axes, plan.plane, (), slice(y0, y1), slice(x0, x1))
        cells = np.asarray(truth.get_orthogonal_selection(selection)).astype(np.int32)
        cells = np.pad(cells, ((y0 - wy0, wy0 + window - y1), (x0 - wx0, wx0 + window - x1)))
        images.append(LabelledImage(cellsam_layout(read_window(plan, tile)), cells))
    return images


def folder_images(folder: str, *, normalize: bool) -> list[LabelledImage]:
    """Every ``NAME.ext`` + ``NAME_labels.ext`` pair of a local folder, in name order."""
    from cellsam_ray.io.images import read_image

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"training folder {folder} is not a folder")
    pairs = []
    for label_path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        stem = re.sub(f"{LABEL_SUFFIX}$", "", label_path.stem)
        if stem == label_path.stem:
            continue
        found = [root / f"{stem}{s}" for s in IMAGE_SUFFIXES if (root / f"{stem}{s}").is_file()]
        if not found:
            raise UserError(f"{label_path} has no image {stem}.npy/.tif/.tiff/.png beside it")
        pairs.append((found[0], label_path))
    if not pairs:
        raise UserError(f"training folder {folder} holds no NAME{LABEL_SUFFIX}.ext label images")
    images = []
    for image_path, label_path in pairs:
        image = format_image_shape(read_image(str(image_path), {}))
        labels = read_image(str(label_path), {})
        if labels.dtype.kind not in "biu" or labels.shape != image.shape[:2]:
            raise UserError(f"{label_path} must be an integer label image of shape {image.shape[:2]}, "
                            f"got {labels.dtype} {labels.shape}")
        image = normalize_image(image) if normalize else image
        images.append(LabelledImage(image.astype(np.float32), labels.astype(np.int32)))
    return images
