"""The CellSAM network: published key layout, and numerics equal to the published code's golden outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam_ray.errors import UserError
from cellsam_ray.model import rcda
from cellsam_ray.model.cellfinder import detector_topk
from cellsam_ray.model.config import CellSAMConfig, load_config
from cellsam_ray.model.network import build_cellsam
from cellsam_ray.testing.checks import reference_dir

REFERENCE = reference_dir()
GOLDEN = REFERENCE / "golden"
CASES = sorted(json.loads((GOLDEN / "cases.json").read_text()))


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return {row[0]: tuple(int(n) for n in row[1].split("x")) for row in rows}


def shapes(config: CellSAMConfig) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        net = build_cellsam(config)
    return [(key, tuple(value.shape)) for key, value in net.state_dict().items()]


def rel_l2(actual: torch.Tensor | np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def tiny_net():
    net = build_cellsam(CellSAMConfig.from_json(str(GOLDEN / "tiny_config.json")))
    net.load_state_dict(torch.load(GOLDEN / "tiny_cellsam.pt", map_location="cpu", weights_only=True), strict=True)
    return net


def test_v12_preset_has_the_published_keys_in_order_with_their_shapes():
    expected = read_tsv(REFERENCE / "cellsam_v1.2_state_dict.tsv")
    assert shapes(CellSAMConfig.preset("v1.2")) == list(expected.items())


def test_tiny_config_has_the_golden_keys_in_order_with_their_shapes():
    expected = read_tsv(GOLDEN / "tiny_state_dict.tsv")
    assert shapes(load_config(str(GOLDEN / "tiny_config.json"))) == list(expected.items())


def test_v12_preset_has_the_published_parameter_count():
    with torch.device("meta"):
        net = build_cellsam(CellSAMConfig.preset("v1.2"))
    # Aliased heads count once: 289.6 M parameters, ~196 M of them used at inference.
    assert sum(p.numel() for p in net.parameters()) == 289_593_534
    assert net.adv_mode and net.sam is net.model_cp


def test_heads_are_one_module_listed_per_decoder_layer():
    config = CellSAMConfig(cellfinder_dec_layers=3, cellfinder_enc_layers=1, encoder_depth=1,
                           encoder_global_attn_indexes=(0,), cellfinder_num_queries=10)
    with torch.device("meta"):
        transformer = build_cellsam(config).cellfinder.decode_head.transformer
    assert len(transformer.class_embed) == 3 and len(transformer.bbox_embed) == 3
    assert all(head is transformer.class_embed[0] for head in transformer.class_embed)
    assert all(head is transformer.bbox_embed[0] for head in transformer.bbox_embed)


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown model config 'v9'"):
        load_config("v9")
    with pytest.raises(UserError, match="unknown model preset"):
        CellSAMConfig.preset("vit_h")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"colour": "red"}))
    with pytest.raises(UserError, match="colour: Extra inputs are not permitted"):
        load_config(str(bad))
    bad.write_text(json.dumps({"encoder_embed_dim": 100, "encoder_num_heads": 3}))
    with pytest.raises(UserError, match="multiple of encoder_num_heads"):
        load_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        load_config(str(bad))


def test_rcda_equals_its_definition(monkeypatch):
    """Against the published formula spelled out: project, average keys, outer-product weights."""
    monkeypatch.setattr(rcda, "QUERY_CHUNK", 4)  # exercise chunking: 10 queries in 3 chunks
    torch.manual_seed(0)
    d, heads, b, q, h, w = 16, 4, 2, 10, 5, 7  # H != W catches swapped axes
    attn = rcda.MultiheadRCDA(d, heads)
    torch.nn.init.normal_(attn.in_proj_bias)
    q_row, q_col = torch.randn(b, q, d), torch.randn(b, q, d)
    k_row, k_col, value = torch.randn(b, h, w, d), torch.randn(b, h, w, d), torch.randn(b, h, w, d)

    wq_r, wq_c, wk_r, wk_c, wv = attn.in_proj_weight.chunk(5)
    bq_r, bq_c, bk_r, bk_c, bv = attn.in_proj_bias.chunk(5)
    hd = d // heads
    split = lambda x: x.unflatten(-1, (heads, hd))  # noqa: E731
    qr = split(q_row @ wq_r.T + bq_r) * hd**-0.5  # (b, q, n, hd)
    qc = split(q_col @ wq_c.T + bq_c) * hd**-0.5
    kr = split((k_row @ wk_r.T + bk_r).mean(1))  # (b, w, n, hd)
    kc = split((k_col @ wk_c.T + bk_c).mean(2))  # (b, h, n, hd)
    v = split(value @ wv.T + bv)  # (b, h, w, n, hd)
    a_row = torch.einsum("bqnc,bwnc->bnqw", qr, kr).softmax(-1)
    a_col = torch.einsum("bqnc,bhnc->bnqh", qc, kc).softmax(-1)
    expected = attn.out_proj(torch.einsum("bnqh,bnqw,bhwnc->bqnc", a_col, a_row, v).flatten(2))

    with torch.inference_mode():
        actual = attn(q_row, q_col, k_row, k_col, value)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_detector_topk_ranks_query_class_pairs_and_scales_xyxy():
    logits = torch.tensor([[[0.0, 3.0], [2.0, -1.0], [1.0, 4.0]]])  # 3 queries, 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.1], [0.9, 0.8, 0.2, 0.2]]])
    scores, labels, xyxy = detector_topk(logits, boxes, image_size=(100, 200))
    assert scores.shape == (1, 3)  # k defaults to the number of queries, as published
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([4.0, 3.0, 2.0])))
    assert labels[0].tolist() == [1, 1, 0]
    # query 2 then 0 then 1; x scaled by W=200, y by H=100
    torch.testing.assert_close(xyxy[0, 0], torch.tensor([160.0, 70.0, 200.0, 90.0]))
    torch.testing.assert_close(xyxy[0, 1], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    assert detector_topk(logits, boxes, k=6)[1][0].tolist() == [1, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("case", CASES)
def test_sam_embedding_matches_golden(tiny_net, case):
    golden = np.load(GOLDEN / f"{case}.expected.npz")
    sam = tiny_net.sam
    unit = torch.from_numpy(golden["model_input_embedding"])
    with torch.inference_mode():
        embedding = sam.image_encoder((unit - sam.pixel_mean / 255) / (sam.pixel_std / 255))
    assert embedding.shape == golden["embedding"].shape
    assert rel_l2(embedding, golden["embedding"]) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_cellfinder_detections_match_golden(tiny_net, case):
    golden = np.load(GOLDEN / f"{case}.expected.npz")
    with torch.inference_mode():
        logits, boxes = tiny_net.cellfinder(torch.from_numpy(golden["model_input_detector"]))
        scores, labels, xyxy = detector_topk(logits, boxes)
    assert scores.shape == golden["detector_scores"][None].shape
    assert rel_l2(scores[0], golden["detector_scores"]) < 1e-4
    assert np.array_equal(labels[0].numpy(), golden["detector_labels"])
    assert rel_l2(xyxy[0], golden["detector_boxes_1024"]) < 1e-4
