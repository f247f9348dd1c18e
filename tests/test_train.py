"""Training: the matcher and losses against hand computations, the loop learns, checkpoints load strictly."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cellsam_ray.model.cellfinder import sine_embedding_1d
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.weights import load_cellsam, load_checkpoint_state
from cellsam_ray.synth import write_synthetic_slide
from cellsam_ray.train.box_ops import generalized_box_iou
from cellsam_ray.train.checkpoint import save_checkpoint
from cellsam_ray.train.data import DataSpec, make_batch, prepare_tile
from cellsam_ray.train.fit import fit
from cellsam_ray.train.loop import Objective, TrainSettings, anchor_points, freeze_parts, initial_model
from cellsam_ray.train.losses import box_regions, detection_losses, mask_losses, sigmoid_focal_loss
from cellsam_ray.train.matcher import MatchCosts, hungarian_match
from cellsam_ray.train.sources import load_images

# A CellSAM small enough to train for a few steps in a test: 64² input, 8² grid, 30 queries.
TINY = dict(
    image_size=64, patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
    encoder_global_attn_indexes=[1], window_size=4, prompt_embed_dim=16, decoder_mlp_dim=32, decoder_num_heads=2,
    mask_in_chans=4, iou_head_hidden_dim=16, cellfinder_hidden_dim=32, cellfinder_nheads=4,
    cellfinder_dim_feedforward=64, cellfinder_enc_layers=1, cellfinder_dec_layers=2, cellfinder_num_queries=30,
    cellfinder_num_classes=1,
)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("train") / "slide.ome.zarr")
    write_synthetic_slide(url, size=(256, 256), channels=3, seed=21, chunk=64)
    return url


def test_matcher_finds_the_cheapest_assignment_not_the_greedy_one():
    # Query 0 is nearest to cell 1, but giving it cell 0 lets query 1 take cell 1: total L1 0.08, not 0.16.
    targets = torch.tensor([[0.30, 0.5, 0.1, 0.1], [0.40, 0.5, 0.1, 0.1]])
    boxes = torch.tensor([[0.36, 0.5, 0.1, 0.1], [0.42, 0.5, 0.1, 0.1], [0.90, 0.5, 0.1, 0.1]])
    logits = torch.zeros(3, 1)
    queries, cells = hungarian_match(logits, boxes, targets, MatchCosts(classification=0, l1=1, giou=0))
    assert queries.tolist() == [0, 1] and cells.tolist() == [0, 1]
    # With every cost term, the answer is the brute-force optimum of the same cost.
    logits = torch.tensor([[2.0], [-1.0], [3.0]])
    queries, cells = hungarian_match(logits, boxes, targets)
    p = logits[:, 0].sigmoid()
    focal = 0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p**2 * -(1 - p).log()
    l1 = torch.cdist(boxes, targets, p=1)
    xyxy = lambda b: torch.cat((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), dim=1)  # noqa: E731
    cost = 2 * focal[:, None] + 5 * l1 - 2 * generalized_box_iou(xyxy(boxes), xyxy(targets))
    best = min(itertools.permutations(range(3), 2), key=lambda qs: float(cost[qs[0], 0] + cost[qs[1], 1]))
    assert sorted(zip(cells.tolist(), queries.tolist())) == [(0, best[0]), (1, best[1])]
    empty = hungarian_match(logits, boxes, torch.zeros(0, 4))
    assert empty[0].numel() == empty[1].numel() == 0


def test_generalized_iou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 0, 3, 1]])
    giou = generalized_box_iou(a, b)
    assert giou[0, 0] == pytest.approx(1 / 7 - 2 / 9)  # overlap 1, union 7, hull 9
    assert giou[1, 1] == pytest.approx(-1 / 3)  # disjoint: union 2, hull 3
    assert generalized_box_iou(a, a).diagonal().tolist() == pytest.approx([1.0, 1.0])


def test_focal_loss_by_hand():
    logits = torch.tensor([0.0, 0.0, 2.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    p2 = 1 / (1 + math.exp(-2))
    expected = [0.25 * math.log(2) * 0.25, 0.75 * math.log(2) * 0.25, 0.25 * -math.log(p2) * (1 - p2) ** 2]
    assert sigmoid_focal_loss(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)


def test_detection_losses_by_hand():
    logits = torch.zeros(1, 2, 1)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    targets = [torch.tensor([[0.55, 0.5, 0.2, 0.2]])]
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    losses = detection_losses(logits, boxes, targets, matches, num_cells=1.0)
    assert losses["classification"].item() == pytest.approx((0.25 + 0.75) * math.log(2) * 0.25)
    assert losses["l1"].item() == pytest.approx(0.05)
    assert losses["giou"].item() == pytest.approx(1 - 0.6)  # IoU 0.03/0.05, hull = union


def test_mask_losses_are_small_for_a_right_mask_and_train_the_iou_head():
    truth = torch.zeros(2, 8, 8)
    truth[:, 2:6, 2:6] = 1
    regions = box_regions(torch.tensor([[2.0, 2, 6, 6], [3, 3, 5, 5]]), 8)
    assert regions[0].all() and regions[1].sum() == 16 and regions[1, 2:6, 2:6].all()  # grown by half a side
    right = (truth * 2 - 1) * 20
    good = mask_losses(right, truth, torch.tensor([1.0, 0.0]), regions)
    assert good["mask_bce"] < 1e-6 and good["mask_dice"] < 0.1
    assert good["mask_iou"].item() == pytest.approx(0.5)  # actual IoU 1 for both; errors 0 and 1
    wrong = mask_losses(-right, truth, torch.tensor([0.0, 0.0]), regions)
    assert wrong["mask_dice"] > 0.9 and wrong["mask_iou"].item() == pytest.approx(0.0)
    # Cross-entropy is the tile's mean plus the region's mean. Logits of -20 everywhere miss the 16 cell
    # pixels (cost 20 each): over region 1 (16 px, all cell) that is 20, over the tile 20·16/64 = 5.
    empty = mask_losses(torch.full((1, 8, 8), -20.0), truth[1:], torch.tensor([0.0]), regions[1:])
    assert empty["mask_bce"].item() == pytest.approx(20 * 16 / 64 + 20, rel=1e-3)


def test_slide_tiles_carry_the_pipeline_view_and_their_cells(slide):
    images = load_images(DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"]), 64)
    assert len(images) == 16 and all(im.image.shape == (64, 64, 3) for im in images)
    assert all(im.image[..., 0].max() == 0 and 0 <= im.image.min() and im.image.max() <= 1 for im in images)
    assert sum(len(np.unique(im.labels)) - 1 for im in images) > 100
    few = load_images(DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=5), 64)
    assert len(few) == 5 and all(im.labels.any() for im in few)
    batch = make_batch([prepare_tile(im, 64) for im in few[:2]], np.random.default_rng(0), masks_per_image=3,
                       box_jitter=0.0, augment=False)
    boxes, prompts, masks = batch.boxes[0], batch.prompts[0], batch.masks[0]
    assert boxes.shape[1] == 4 and 0 <= boxes.min() and boxes.max() <= 1 and len(prompts) == len(masks) == 3
    for prompt, mask in zip(prompts, masks):  # an unjittered prompt is its mask's pixel-edge box
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert prompt.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(slide, tiny_config):
    settings = TrainSettings(config=tiny_config, lr=2e-3, clip=None, seed=3)
    net = initial_model(settings)
    freeze_parts(net, settings)
    items = load_images(DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=2), 64)
    batch = make_batch([prepare_tile(im, 64) for im in items], np.random.default_rng(0), masks_per_image=4,
                       box_jitter=0.0, augment=False)
    objective = Objective(net, settings)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=settings.lr)
    history = []
    for _ in range(25):
        terms = objective(batch)
        history.append({k: float(v.detach()) for k, v in terms.items()})
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"]
    # Dice is left out: early on the masks first learn the background, which briefly raises it.
    for term in ("classification", "l1", "giou", "mask_bce"):
        assert last[term] < first[term], term


def test_frozen_parts_keep_their_weights(slide, tiny_config, tmp_path):
    settings = TrainSettings(config=tiny_config, steps=2, batch_size=1, freeze=["cellfinder-trunk", "mask-decoder"])
    data = DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=2)
    before = initial_model(settings).state_dict()
    after = fit(settings, data, tmp_path, log=lambda line: None).state_dict()
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        frozen = key.startswith(("cellfinder.decode_head.backbone.", "model_cp.mask_decoder.", "model."))
        trained = key.startswith(("cellfinder.decode_head.transformer.decoder_layers.", "model_cp.image_encoder.blocks."))
        assert not (frozen and changed), key
        assert changed or not trained, key


def test_fit_writes_a_checkpoint_that_loads_strictly(slide, tiny_config, tmp_path):
    settings = TrainSettings(config=tiny_config, steps=3, batch_size=2, log_every=1)
    lines: list[str] = []
    net = fit(settings, DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"]), tmp_path,
              log=lines.append)
    assert lines[0] == "16 labelled tiles of 64² px; training on cpu" and lines[-1].endswith("cellsam.pt")
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [1, 2, 3]
    loaded = load_cellsam(str(tmp_path / "cellsam.pt"), str(tmp_path / "config.json"))
    assert loaded.adv_mode and CellSAMConfig.from_json(str(tmp_path / "config.json")) == net.config
    expected = net.state_dict()
    for key, value in loaded.state_dict().items():
        twin = "model_cp." + key.removeprefix("model.") if key.startswith("model.") else key
        assert torch.equal(value, expected[twin]), key  # the legacy branch is saved as the trained one


def test_checkpoint_stores_shared_weights_once(tiny_config, tmp_path):
    net = initial_model(TrainSettings(config=tiny_config))
    path = save_checkpoint(net, tmp_path)
    state = load_checkpoint_state(str(path))
    assert set(state) == set(net.state_dict())
    separate = tmp_path / "separate.pt"
    torch.save({k: v.clone() for k, v in state.items()}, separate)
    assert path.stat().st_size < 0.8 * separate.stat().st_size


def test_tied_trunks_train_as_one_and_are_saved_under_both_names(slide, tiny_config, tmp_path):
    settings = TrainSettings(config=tiny_config, steps=2, batch_size=1, tie_trunks=True)
    net = fit(settings, DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=1),
              tmp_path, log=lambda line: None)
    body, encoder = net.cellfinder.decode_head.backbone.body, net.model_cp.image_encoder
    assert body.blocks is encoder.blocks and body.pos_embed is encoder.pos_embed
    state = load_checkpoint_state(str(tmp_path / "cellsam.pt"))
    assert torch.equal(state["cellfinder.decode_head.backbone.body.blocks.0.attn.qkv.weight"],
                       state["model_cp.image_encoder.blocks.0.attn.qkv.weight"])
    # Restarting from the checkpoint: separate parameters again unless tied, and a frozen name freezes both.
    again = initial_model(settings.model_copy(update={"init": str(tmp_path / "cellsam.pt"), "tie_trunks": False}))
    assert again.cellfinder.decode_head.backbone.body.pos_embed is not again.model_cp.image_encoder.pos_embed
    assert again.model.image_encoder.pos_embed.data_ptr() != again.model_cp.image_encoder.pos_embed.data_ptr()
    tied = initial_model(settings.model_copy(update={"init": str(tmp_path / "cellsam.pt"), "freeze": ["sam-trunk"]}))
    freeze_parts(tied, settings.model_copy(update={"freeze": ["sam-trunk"]}))
    assert not tied.cellfinder.decode_head.backbone.body.blocks[0].attn.qkv.weight.requires_grad


def test_anchor_cost_gives_each_cell_to_the_query_whose_anchor_is_nearest():
    # Query 0's box sits on cell 0 but its anchor is far away; query 1's box is off but its anchor is on it.
    targets = torch.tensor([[0.2, 0.2, 0.1, 0.1]])
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]])
    anchors = torch.tensor([[0.8, 0.8], [0.21, 0.19]])
    logits = torch.zeros(2, 1)
    assert hungarian_match(logits, boxes, targets)[0].tolist() == [0]  # plain DETR cost: the box decides
    assert hungarian_match(logits, boxes, targets, MatchCosts(anchor=20), anchors)[0].tolist() == [1]
    with pytest.raises(ValueError, match="anchor points"):
        hungarian_match(logits, boxes, targets, MatchCosts(anchor=1))


def test_grid_anchors_cover_the_image_and_stay_put_when_frozen(slide, tiny_config, tmp_path):
    settings = TrainSettings(config=tiny_config, steps=2, batch_size=1, freeze_anchors=True, match_anchor=10)
    start = anchor_points(initial_model(settings)).detach().clone()
    # 30 queries: 5 rows of 6, at the centres of the grid's cells.
    xs, ys = sorted(set(start[:, 0].tolist())), sorted(set(start[:, 1].tolist()))
    assert np.allclose(xs, (np.arange(6) + 0.5) / 6) and np.allclose(ys, (np.arange(5) + 0.5) / 5)
    assert len({tuple(p) for p in start.tolist()}) == 30
    net = fit(settings, DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=2),
              tmp_path, log=lambda line: None)
    assert torch.equal(anchor_points(net), start)
    assert not torch.equal(net.cellfinder.decode_head.transformer.pattern.weight,
                           initial_model(settings).cellfinder.decode_head.transformer.pattern.weight)
    state = load_checkpoint_state(str(tmp_path / "cellsam.pt"))
    assert torch.equal(state["cellfinder.decode_head.transformer.position.weight"], start)  # same key, same shape
    # Learned anchors (the default) move; random ones are not a grid; a checkpoint keeps its own unless told.
    moved = fit(settings.model_copy(update={"freeze_anchors": False}),
                DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"], max_tiles=2),
                tmp_path / "learned", log=lambda line: None)
    assert not torch.equal(anchor_points(moved), start)
    random = anchor_points(initial_model(settings.model_copy(update={"anchors": "random"})))
    assert len(set(random[:, 0].tolist())) == 30 and 0 <= random.min() and random.max() <= 1
    resumed = settings.model_copy(update={"init": str(tmp_path / "learned" / "cellsam.pt")})
    assert torch.equal(anchor_points(initial_model(resumed)), anchor_points(moved))
    regrid = anchor_points(initial_model(resumed.model_copy(update={"anchors": "grid"})))
    assert torch.equal(regrid, start)


def test_local_attention_starts_every_query_on_its_own_column_and_keeps_the_layout(tiny_config, tmp_path):
    plain = initial_model(TrainSettings(config=tiny_config))
    path = save_checkpoint(plain, tmp_path)
    net = initial_model(TrainSettings(config=tiny_config, init=str(path), anchors="grid", local_attention=True))
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # The trunk is the checkpoint's; the transformer is new.
    assert torch.equal(net.state_dict()["cellfinder.decode_head.backbone.body.pos_embed"],
                       plain.state_dict()["cellfinder.decode_head.backbone.body.pos_embed"])
    transformer = net.cellfinder.decode_head.transformer
    d, grid, heads = transformer.d_model, 8, 4  # TINY: 64 px / patch 8, width 32, 4 heads of 8
    with torch.no_grad():
        columns = transformer.adapt_pos1d(sine_embedding_1d((torch.arange(grid) + 0.5) / grid, d))
        anchors = anchor_points(net)
        queries = transformer.adapt_pos1d(sine_embedding_1d(anchors[:, 0], d))
        for layer in transformer.decoder_layers:
            weight = layer.cross_attn.in_proj_weight
            q = (queries @ weight[:d].T).view(-1, heads, d // heads)
            k = (columns @ weight[2 * d : 3 * d].T).view(grid, heads, d // heads)
            logits = torch.einsum("qhc,khc->hqk", q, k)
            best = logits.max(-1).values.argmax(0)  # the head that sees the query's half of the map
            peak = logits[best, torch.arange(len(anchors))].argmax(-1)
            assert ((peak + 0.5 - anchors[:, 0] * grid).abs() <= 0.5 + 1e-4).all()  # the column under the anchor
            assert (logits.max(-1).values.max(0).values > 10).all()  # sharp: a softmax puts it on one column
    loaded = load_cellsam(str(save_checkpoint(net, tmp_path / "local")), tiny_config)
    assert torch.equal(loaded.state_dict()["cellfinder.decode_head.transformer.adapt_pos1d.0.weight"],
                       transformer.adapt_pos1d[0].weight)



def test_a_stopped_run_resumes_at_its_last_checkpoint_step(slide, tiny_config, tmp_path):
    data = DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"])
    first = TrainSettings(config=tiny_config, steps=4, batch_size=1, log_every=1, checkpoint_every=2, resume=True)
    fit(first, data, tmp_path, log=lambda line: None)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"]  # the optimiser's moments are kept
    saved = load_checkpoint_state(str(tmp_path / "cellsam.pt"))
    lines: list[str] = []
    longer = first.model_copy(update={"steps": 6})
    resumed = fit(longer, data, tmp_path, log=lines.append)
    assert "resuming after step 4" in lines[0]
    steps = [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    key = "model_cp.mask_decoder.iou_prediction_head.layers.0.weight"
    assert not torch.equal(resumed.state_dict()[key], saved[key])  # it went on training from there
    # A run that had already reached its steps starts afresh rather than doing nothing.
    fit(first, data, tmp_path, log=lines.append)
    assert [json.loads(line)["step"] for line in (tmp_path / "losses.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_validation_tiles_are_held_back_and_scored_before_and_after(slide, tiny_config, tmp_path):
    lines: list[str] = []
    settings = TrainSettings(config=tiny_config, steps=2, batch_size=1, log_every=1, validation_tiles=3)
    fit(settings, DataSpec(slides=[slide], nuclear=["DAPI"], whole_cell=["E-cadherin"]), tmp_path, log=lines.append)
    assert lines[0].startswith("13 labelled tiles of 64² px") and "3 held back for validation" in lines[0]
    assert any(line.startswith("validation before: F1@0.5") for line in lines)
    assert any(line.startswith("validation after:  F1@0.5") for line in lines)
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["tiles"] == 3 and report["before"]["true"] == report["after"]["true"] > 0


def test_styled_synthetic_data_is_drawn_in_memory_in_every_style_asked():
    spec = DataSpec(synthetic_seeds=[1], synthetic_styles=["nuclei", "brightfield"], synthetic_size=192)
    images = load_images(spec, 64)
    assert len(images) > 8 and all(im.image.shape[-1] == 3 and not im.image[..., 0].any() for im in images)
    assert any(im.image[..., 1].any() for im in images) and any(im.image[..., 2].any() for im in images)
    with pytest.raises(ValueError, match="synthetic styles need synthetic seeds"):
        DataSpec(synthetic_styles=["nuclei"], folder="x")
