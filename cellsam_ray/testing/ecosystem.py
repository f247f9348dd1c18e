"""Test slides as other tools write them: ome-zarr-py's own writer, and bioformats2raw's published layout.

The pipeline must take what users have, not only what ``cellsam-ray synth`` writes, so the tests use files
made by the ecosystem's writers: ``ome_zarr.writer.write_image`` / ``write_labels`` (NGFF 0.4 and 0.5,
their default pyramid, halved with floor; any ``scale_factors``; sharded zarr v3 arrays) and, since
bioformats2raw is a Java tool, its documented layout built here (a root marked
``bioformats2raw.layout``, series ``0/`` an NGFF 0.4 image with 5-D ``tczyx`` arrays chunked
1×1×1×c×c with ``/`` chunk keys, floor-halved levels, ``OME/METADATA.ome.xml``).

The pixels are simple on purpose: round cells on a jittered grid (the ground truth, a label image), bright
in fluorescence channels or dark purple nuclei on pink tissue and white glass in brightfield RGB.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import fsspec
import numpy as np
import zarr

from cellsam_ray.io.storage import join_url, open_group


# ------------------------------------------------------------------------------------------- pixels
def disc_cells(shape: tuple[int, int], *, seed: int, spacing: int = 22, radius: tuple[int, int] = (4, 8),
               where: np.ndarray | None = None) -> np.ndarray:
    """An int32 label image of round cells on a jittered grid (ids 1..N), only where ``where`` is True."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, dtype=np.int32)
    next_id = 1
    slack = max(spacing // 2 - radius[1] - 1, 0)
    for cy in range(spacing // 2, h, spacing):
        for cx in range(spacing // 2, w, spacing):
            y, x = cy + rng.integers(-slack, slack + 1), cx + rng.integers(-slack, slack + 1)
            if where is not None and not where[min(y, h - 1), min(x, w - 1)]:
                continue
            r = rng.integers(radius[0], radius[1] + 1)
            y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, h), max(x - r, 0), min(x + r + 1, w)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            labels[y0:y1, x0:x1][disc] = next_id
            next_id += 1
    return labels


def fluorescence(labels: np.ndarray, channels: int, dtype: Any, *, seed: int) -> np.ndarray:
    """(channels, y, x) pixels of ``dtype``: cells bright in every channel (brightest in channel 0), on a dim
    noisy background. int16 backgrounds go below zero; float32 is in [0, 1]."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    cells = labels > 0
    unit = np.empty((channels,) + labels.shape, dtype=np.float32)
    for c in range(channels):
        unit[c] = np.where(cells, 0.6 if c == 0 else 0.35, 0.03) + rng.normal(0, 0.01, labels.shape)
    if dtype.kind == "f":
        return np.clip(unit, 0, 1).astype(dtype)
    if dtype == np.int16:
        return np.clip(unit * 4000 - 200, -32768, 32767).astype(dtype)
    top = 255 if dtype == np.uint8 else 4000
    return np.clip(unit * top, 0, np.iinfo(dtype).max).astype(dtype)


def brightfield(labels: np.ndarray, tissue: np.ndarray, *, seed: int, alpha: bool = False) -> np.ndarray:
    """(3 or 4, y, x) uint8 RGB(A) of an H&E-like slide: white glass, pink tissue, dark purple nuclei."""
    rng = np.random.default_rng(seed)
    colour = np.empty((3,) + labels.shape, dtype=np.float32)
    for c, (glass, stroma, nucleus) in enumerate(((242, 222, 70), (242, 160, 40), (244, 195, 120))):
        colour[c] = np.where(labels > 0, nucleus, np.where(tissue, stroma, glass))
    colour += rng.normal(0, 3, colour.shape)
    rgb = np.clip(colour, 0, 255).astype(np.uint8)
    if alpha:
        rgb = np.concatenate([rgb, np.full((1,) + labels.shape, 255, dtype=np.uint8)])
    return rgb


# ------------------------------------------------------------------------------------------ ome-zarr-py
def write_with_ome_zarr_py(
    url: str,
    image: np.ndarray,
    *,
    version: str = "0.4",
    axes: str = "cyx",
    channel_names: Sequence[str] | None = None,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    scale_factors: Sequence[int] | Sequence[dict] | None = None,
    pixel_size: float = 0.5,
    ground_truth: np.ndarray | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write ``image`` with ``ome_zarr.writer.write_image`` (its default pyramid unless ``scale_factors``),
    and ``ground_truth`` (y, x) as ``labels/ground_truth`` with ``write_labels``; ``channel_names=None``
    writes no ``omero`` metadata. Returns ``url``."""
    from ome_zarr.format import FormatV04, FormatV05

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # importing the writer warns about its Scaler class
        from ome_zarr.writer import write_image, write_labels

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = open_group(url, storage_options, mode="w", zarr_format=2 if version == "0.4" else 3)
    options: dict[str, Any] = {}
    if chunks:
        options["chunks"] = tuple(chunks)
    if shards:
        options["shards"] = tuple(shards)
    extra: dict[str, Any] = {}
    if scale_factors is not None:
        extra["scale_factors"] = list(scale_factors)
    metadata = {}
    if channel_names is not None:
        metadata["omero"] = {"channels": [
            {"label": n, "color": "FFFFFF", "window": {"start": 0, "end": 1, "min": 0, "max": 1}}
            for n in channel_names]}
    scale = {a: (pixel_size if a in "yx" else 1.0) for a in axes}
    units = {a: "micrometer" for a in axes if a in "zyx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        write_image(image, group, fmt=fmt, axes=list(axes), storage_options=options or None, scale=scale,
                    axes_units=units, **extra, **metadata)
        if ground_truth is not None:
            levels = len(_multiscale(group)["datasets"])
            label_factors = extra.get("scale_factors", [2**k for k in range(1, levels)])
            label_factors = [{a: f.get(a, 1) for a in "yx"} if isinstance(f, dict) else f for f in label_factors]
            write_labels(ground_truth, group, name="ground_truth", fmt=fmt, axes=["y", "x"], scaler=None,
                         scale_factors=label_factors, storage_options={"chunks": (64, 64)},
                         scale={"y": pixel_size, "x": pixel_size}, axes_units={"y": "micrometer", "x": "micrometer"})
    return url


def _multiscale(group: zarr.Group) -> dict:
    attrs = dict(group.attrs)
    return (attrs["ome"] if "ome" in attrs else attrs)["multiscales"][0]


# ----------------------------------------------------------------------------------------- bioformats2raw
OME_XML = """<?xml version="1.0" encoding="UTF-8"?>
<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" Creator="cellsam-ray test fixture">
  <Image ID="Image:0" Name="{name}">
    <Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="{type}" SizeX="{x}" SizeY="{y}" SizeZ="1" SizeC="{c}"
            SizeT="1" PhysicalSizeX="{px}" PhysicalSizeY="{px}" BigEndian="false">
{channels}      <MetadataOnly/>
    </Pixels>
  </Image>
</OME>
"""


def write_bioformats2raw(
    url: str,
    image: np.ndarray,
    *,
    channel_names: Sequence[str],
    chunk: int = 128,
    levels: int | None = None,
    pixel_size: float = 0.5,
    storage_options: dict | None = None,
) -> str:
    """Write ``image`` (c, y, x) in bioformats2raw's layout; returns the series URL (``<url>/0``).

    The root holds ``"bioformats2raw.layout": 3`` and ``OME/`` (``series`` attribute, METADATA.ome.xml);
    series ``0`` is an NGFF 0.4 image of 5-D ``tczyx`` arrays (t = z = 1) chunked (1, 1, 1, chunk, chunk)
    with ``/`` chunk keys, levels halved with floor (every other pixel, as its default SIMPLE
    downsampling) until one fits in a chunk, each dataset with a scale and no translation.
    """
    c, h, w = image.shape
    root = open_group(url, storage_options, mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    ome = root.create_group("OME")
    ome.attrs["series"] = ["0"]
    series = root.create_group("0")
    data = image[None, :, None]  # t, c, z, y, x
    datasets = []
    k = 0
    while True:
        array = series.create_array(str(k), shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, chunk, chunk),
                                    chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=0)
        array[:] = data
        f = 2.0**k
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0, pixel_size * f, pixel_size * f]}]})
        k += 1
        if (levels is not None and k >= levels) or (levels is None and max(data.shape[-2:]) <= chunk):
            break
        ny, nx = data.shape[-2] // 2, data.shape[-1] // 2
        data = data[..., : 2 * ny : 2, : 2 * nx : 2]
    axes = [{"name": "t", "type": "time", "unit": "millisecond"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    top = float(np.iinfo(image.dtype).max) if image.dtype.kind in "iu" else 1.0
    series.attrs.update({
        "multiscales": [{"version": "0.4", "name": "image", "axes": axes, "datasets": datasets}],
        "omero": {"channels": [{"label": n, "color": "FFFFFF", "active": True,
                                "window": {"min": 0.0, "max": top, "start": 0.0, "end": top}}
                               for n in channel_names]},
    })
    xml_channels = "".join(f'      <Channel ID="Channel:0:{i}" Name="{n}" SamplesPerPixel="1"/>\n'
                           for i, n in enumerate(channel_names))
    xml = OME_XML.format(name="fixture", type={"float32": "float"}.get(str(image.dtype), str(image.dtype)),
                         x=w, y=h, c=c, px=pixel_size, channels=xml_channels)
    fs, path = fsspec.core.url_to_fs(join_url(url, "OME", "METADATA.ome.xml"), **(storage_options or {}))
    fs.pipe_file(path, xml.encode())
    return join_url(url, "0")


def write_sparse_bioformats2raw(url: str, truth_url: str, *, size: tuple[int, int], tissue: tuple[int, int, int, int],
                                chunk: int = 1024, seed: int = 0) -> tuple[str, np.ndarray]:
    """A whole-slide-sized image in bioformats2raw's layout (2 uint16 channels, 5-D, ``/`` keys, floor-halved
    levels down to one chunk) with tissue only in the box ``tissue`` = (y0, x0, h, w): every other chunk
    is never written (zarr's fill value), as a scanner's converter leaves glass. The ground truth of the
    box goes to ``truth_url`` (an image with ``labels/ground_truth``, also written only there, for
    ``GroundTruthSegmenter``). Returns the series URL and the box's ground truth."""
    from cellsam_ray.io import ngff

    height, width = size
    y0, x0, h, w = tissue
    truth = disc_cells((h, w), seed=seed)
    pixels = fluorescence(truth, 2, np.uint16, seed=seed)
    root = open_group(url, mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    root.create_group("OME").attrs["series"] = ["0"]
    series = root.create_group("0")
    datasets, k, shape = [], 0, (height, width)
    while True:
        array = series.create_array(str(k), shape=(1, 2, 1, *shape), dtype=np.uint16, chunks=(1, 1, 1, chunk, chunk),
                                    chunk_key_encoding={"name": "v2", "separator": "/"}, fill_value=0)
        f = 2**k
        ys, xs = -(-y0 // f), -(-x0 // f)  # the level's pixels that sample the box (every f-th)
        block = pixels[:, ys * f - y0 :: f, xs * f - x0 :: f]
        array[0, :, 0, ys : ys + block.shape[1], xs : xs + block.shape[2]] = block
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0, 0.5 * f, 0.5 * f]}]})
        if max(shape) <= chunk:
            break
        k, shape = k + 1, (shape[0] // 2, shape[1] // 2)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    series.attrs.update({
        "multiscales": [{"version": "0.4", "name": "image", "axes": axes, "datasets": datasets}],
        "omero": {"channels": [{"label": n, "color": "FFFFFF", "active": True,
                                "window": {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 4000.0}}
                               for n in ("DAPI", "CD45")]},
    })
    xml = OME_XML.format(name="sparse fixture", type="uint16", x=width, y=height, c=2, px=0.5,
                         channels="".join(f'      <Channel ID="Channel:0:{i}" Name="{n}" SamplesPerPixel="1"/>\n'
                                          for i, n in enumerate(("DAPI", "CD45"))))
    fs, path = fsspec.core.url_to_fs(join_url(url, "OME", "METADATA.ome.xml"))
    fs.pipe_file(path, xml.encode())

    image = ngff.create_image(truth_url, shape=(1, height, width), dtype=np.uint8, chunks=(1, chunk, chunk),
                              axes=ngff.image_axes("cyx"), scale=(1.0, 0.5, 0.5), levels=1, version="0.4")
    labels = ngff.create_labels(image, "ground_truth", chunks=(chunk, chunk), run_id="fixture")
    labels.array(0)[y0 : y0 + h, x0 : x0 + w] = truth
    ngff.publish_label(image, "ground_truth")
    return join_url(url, "0"), truth
