"""Fast mode gives the reference's answers: on the golden tiles, and piece by piece against the reference ops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention

from cellsam_ray.evaluate import label_agreement
from cellsam_ray.model import fast, paint
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.decoder import decode
from cellsam_ray.model.encoders import attention
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.model.postprocess import paint_masks
from cellsam_ray.model.reference import segment_tile_reference
from cellsam_ray.model.weights import load_cellsam
from cellsam_ray.testing.checks import reference_dir

GOLDEN = reference_dir() / "golden"
CASES = json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def golden_runs():
    """Reference and fast results for every golden case; fast runs all tiles (mixed shapes) as one batch."""
    model = load_cellsam(str(GOLDEN / "tiny_cellsam.pt"), str(GOLDEN / "tiny_config.json"))
    cases = sorted(CASES)
    images = [np.load(GOLDEN / f"{case}.input.npy") for case in cases]
    references = [segment_tile_reference(img, model, normalize=CASES[c]["normalize"], keep_embedding=True)
                  for img, c in zip(images, cases)]
    fasts = {}
    for flag in (True, False):
        chosen = [i for i, case in enumerate(cases) if CASES[case]["normalize"] is flag]
        for i, result in zip(chosen, fast.segment_tiles_fast([images[i] for i in chosen], model, normalize=flag,
                                                                     keep_embedding=True)):
            fasts[i] = result
    return {case: (references[i], fasts[i], np.load(GOLDEN / f"{case}.expected.npz")) for i, case in enumerate(cases)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_mode_matches_reference_and_golden(golden_runs, case):
    reference, result, golden = golden_runs[case]
    assert result.boxes.shape == reference.boxes.shape  # the same boxes survive, in paint order
    np.testing.assert_allclose(result.boxes, reference.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(result.scores, reference.scores, rtol=1e-4)
    np.testing.assert_allclose(result.ious, reference.ious, atol=1e-5)
    np.testing.assert_allclose(result.embedding, reference.embedding, rtol=1e-4, atol=1e-5)
    for expected in (reference.labels, golden["labels"]):
        agree, worst_iou = label_agreement(result.labels, expected)
        assert agree >= 0.995 and worst_iou >= 0.9
        assert result.labels.max() == expected.max()


def test_chunking_and_grouping_do_not_change_labels(golden_runs, monkeypatch):
    case = "gray_512_norm"
    model = load_cellsam(str(GOLDEN / "tiny_cellsam.pt"), str(GOLDEN / "tiny_config.json"))
    monkeypatch.setattr(paint, "WINDOW_BUDGET", 5000)  # many small paste groups
    image = np.load(GOLDEN / f"{case}.input.npy")
    for options in (dict(box_chunk=7), dict(box_chunk=16, static_chunks=True, paint_boxes=40)):
        result = fast.segment_tile_fast(image, model, **options)  # 100 boxes: a padded last chunk, 3 paint calls
        np.testing.assert_array_equal(result.labels, golden_runs[case][1].labels)
        np.testing.assert_array_equal(result.ious, golden_runs[case][1].ious)


@pytest.mark.parametrize("shape", [(300, 200), (1500, 700), (1024, 1024), (37, 1100)])
def test_tile_taps_reproduce_the_reference_resize(shape):
    """The model-frame -> tile resize from ``_axis_taps``: PyTorch's own taps, to float rounding."""
    torch.manual_seed(0)
    frame = torch.randn(1, 1024, 1024) * 8
    expected = F.interpolate(frame[:, None], shape, mode="bilinear", align_corners=False)[:, 0]
    rows, cols = paint.axis_taps(1024, shape[0]), paint.axis_taps(1024, shape[1])
    g = torch.zeros(1, 1, dtype=torch.long)
    actual = paint.bilinear_at(
        frame, g, rows.i0[None], rows.i1[None], rows.w0[None], rows.w1[None],
        cols.i0[None], cols.i1[None], cols.w0[None], cols.w1[None],
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)  # a few float32 ulps of |values| ≤ 40


@pytest.mark.parametrize("shape", [(300, 200), (640, 480), (1100, 90), (192, 192), (64, 40)])
def test_windowed_painting_equals_full_resolution_painting(shape, monkeypatch):
    """Masks that reach anywhere (no boxes at all), overlap, touch the border, vanish or are rejected."""
    torch.manual_seed(1)
    n = 12
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    centres, radii = torch.rand(n, 2) * 256, torch.rand(n) * 40 + 1
    low = radii[:, None, None] - ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    low[3] = -5.0  # reaches nothing
    low[0] = 3.0  # covers the whole tile; later masks paint over it
    keep = torch.rand(n) > 0.25
    rank = torch.cumsum(keep, 0, dtype=torch.int32)
    monkeypatch.setattr(paint, "WINDOW_BUDGET", 20_000)  # several groups

    labels = torch.zeros(shape[0] * shape[1], dtype=torch.int32)
    reach = (low > np.log(0.4 / 0.6) - paint.THRESHOLD_MARGIN) & keep[:, None, None]
    rows = paint.axis(256, 1024, shape[0], torch.device("cpu"))
    cols = paint.axis(256, 1024, shape[1], torch.device("cpu"))
    paint.paint(labels, low, reach, rank, rows, cols, 0.4)

    full = F.interpolate(low[:, None], (1024, 1024), mode="bilinear", align_corners=False)
    full = F.interpolate(full, shape, mode="bilinear", align_corners=False)[:, 0]
    expected = paint_masks((torch.sigmoid(full[keep]) > 0.4).numpy(), shape)
    assert len(np.unique(expected)) > 5
    np.testing.assert_array_equal(labels.view(shape).numpy(), expected)


def test_fused_vit_attention_equals_sam_attention():
    torch.manual_seed(2)
    for size, window in ((16, False), (14, True)):
        attn = Attention(32, 4, qkv_bias=True, use_rel_pos=True, input_size=(size, size)).eval()
        torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
        x = torch.randn(3 if window else 1, size, size, 32)
        with torch.inference_mode():
            torch.testing.assert_close(attention(attn, x), attn(x), rtol=1e-5, atol=1e-5)


def test_batched_decoder_equals_one_call_per_box():
    torch.manual_seed(3)
    config = CellSAMConfig(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, encoder_global_attn_indexes=(0,),
                           prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
                           cellfinder_enc_layers=1, cellfinder_dec_layers=1, cellfinder_num_queries=10)
    sam = build_cellsam(config).sam
    embedding = torch.randn(1, 32, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 180.0], [500.0, 600.0, 540.0, 700.0], [0.0, 0.0, 1023.0, 1023.0]])
    with torch.inference_mode():
        masks, ious = decode(sam, embedding, sam.prompt_encoder.get_dense_pe(), boxes)
        for i, box in enumerate(boxes):
            sparse, dense = sam.prompt_encoder(points=None, boxes=box.view(1, 4), masks=None)
            one_mask, one_iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            torch.testing.assert_close(masks[i], one_mask[0, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ious[i], one_iou[0, 0], rtol=1e-5, atol=1e-5)


def test_a_tile_without_detections_is_background():
    model = load_cellsam(str(GOLDEN / "tiny_cellsam.pt"), str(GOLDEN / "tiny_config.json"))
    result = fast.segment_tile_fast(np.load(GOLDEN / "rgb3_256_nonorm.input.npy"), model, bbox_threshold=2.0)
    assert result.labels.shape == (256, 256) and not result.labels.any()
    assert result.boxes.shape == (0, 4) and len(result.scores) == len(result.ious) == 0
