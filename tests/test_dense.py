"""RepFusion's dense tasks: CelebAMask-HQ and WFLW read exactly as published (label maps with the official part order
and overwrites, the official partition, face crops, flips with pair swaps), mIoU / NME / FR / AUC equal to hand-computed
values, heatmap encoding and decoding, the official model shapes, and short seg / landmark runs that learn."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import repfusion as rf
from data import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for these tiny tensors

# ----------------------------------------------------------------------------------------------
# CelebAMask-HQ


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")  # lossless, also under a .jpg name


def _part(shape, rows, cols):
    """A part annotation as published: an RGB PNG, the part white (255, 255, 255) on black."""
    m = np.zeros((*shape, 3), np.uint8)
    m[rows, cols] = 255
    return m


def write_celebamask(root, size=8, image_px=16):
    """A CelebAMask-HQ release in miniature (images image_px, masks size): ids 0..4 and 2000 (annotation folder 1), a
    mapping file whose orig_idx sit on both sides of CelebA's partition boundaries, and per-part masks that overlap."""
    rng = np.random.default_rng(0)
    orig = {0: 162769, 1: 162770, 2: 162771, 3: 182637, 4: 182638, 2000: 5}  # train train val val test train
    with open(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"), "w") as f:
        f.write("idx         orig_idx        orig_file\n")
        for i, o in orig.items():
            f.write(f"{i}           {o}           {o + 1:06d}.jpg\n")
    images = {}
    for i in orig:
        images[i] = rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        _png(os.path.join(root, "CelebA-HQ-img", f"{i}.jpg"), images[i])
    anno = os.path.join(root, "CelebAMask-HQ-mask-anno")
    s = (size, size)
    for i in orig:
        d = os.path.join(anno, str(i // 2000))
        _png(os.path.join(d, f"{i:05d}_skin.png"), _part(s, slice(0, size), slice(0, size)))     # everything
        _png(os.path.join(d, f"{i:05d}_hair.png"), _part(s, slice(0, 4), slice(0, size)))       # top half (label 17)
        _png(os.path.join(d, f"{i:05d}_hat.png"), _part(s, slice(0, 2), slice(0, 4)))           # top-left corner (18)
        _png(os.path.join(d, f"{i:05d}_l_eye.png"), _part(s, slice(5, 6), slice(1, 3)))         # label 4
        _png(os.path.join(d, f"{i:05d}_nose.png"), _part(s, slice(5, 7), slice(2, 4)))          # label 10, after l_eye
    expect = np.ones(s, np.uint8)  # skin
    expect[0:4] = 17
    expect[0:2, 0:4] = 18
    expect[5:6, 1:3] = 4
    expect[5:7, 2:4] = 10  # the nose is painted after the eye: it wins where they overlap
    return images, expect


def test_celebamask_merges_parts_in_the_published_order_and_splits_by_the_mapping(tmp_path):
    images, expect = write_celebamask(str(tmp_path))
    assert data.celebamask_split(str(tmp_path), "train") == [0, 1, 2000]
    assert data.celebamask_split(str(tmp_path), "val") == [2, 3]
    assert data.celebamask_split(str(tmp_path), "test") == [4]
    for idx in (0, 2000):
        np.testing.assert_array_equal(data.celebamask_label_map(str(tmp_path), idx), expect)
    ds = data.load(str(tmp_path), "val", image_size=8)
    assert ds.task == "seg" and ds.classes[0] == "background" and ds.classes[17:] == ["hair", "hat"] and len(ds.classes) == 19
    assert ds.images.shape == (2, 3, 8, 8) and ds.masks.shape == (2, 8, 8) and ds.masks.dtype == torch.uint8
    np.testing.assert_array_equal(ds.masks[0].numpy(), expect)
    # images (16 px) and masks (8 px) are brought to one size together: bilinear for the image, nearest for the mask
    want = np.asarray(Image.fromarray(images[2]).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), want)
    big = data.load(str(tmp_path), "test", image_size=16)
    np.testing.assert_array_equal(big.masks[0].numpy(), np.repeat(np.repeat(expect, 2, 0), 2, 1))


def test_celebamask_merged_label_maps_in_both_published_numberings(tmp_path):
    _, expect = write_celebamask(str(tmp_path))
    root = str(tmp_path)
    # g_mask.py (the CelebAMask-HQ repo) numbers the parts in its own order: skin 1, nose 2, l_eye 4, hair 13, hat 14
    gmask = {1: 1, 10: 2, 4: 4, 17: 13, 18: 14}
    _png(os.path.join(root, "CelebAMaskHQ-mask", "2.png"), np.vectorize(gmask.get)(expect).astype(np.uint8))
    np.testing.assert_array_equal(data.celebamask_label_map(root, 2), expect)
    _png(os.path.join(root, "mask", "2.png"), expect)  # RepFusion's process_celebahqmask.py: CELEBAMASK_PARTS' numbering
    np.testing.assert_array_equal(data.celebamask_label_map(root, 2), expect)
    os.remove(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"))
    with pytest.raises(UserError, match="CelebA-HQ-to-CelebA-mapping.txt: missing"):
        data.load(root, "train", image_size=8)

# ----------------------------------------------------------------------------------------------
# WFLW


def write_wflw(root, size=40):
    """Two images (one with two faces) and the published annotation lines. The boxes are 32 px squares at integer
    centres, so with padding 1.25 and size 40 each crop is an integer translation of the image (k = 1)."""
    rng = np.random.default_rng(1)
    imgs = {"1--Handshaking/a.png": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
            "2--Demonstration/b.png": rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)}
    for rel, a in imgs.items():
        _png(os.path.join(root, "WFLW_images", rel), a)
    faces = [("1--Handshaking/a.png", (10, 12, 42, 44), (1, 0, 0, 1, 0, 0)),
             ("2--Demonstration/b.png", (20, 20, 52, 52), (0, 1, 0, 0, 0, 1)),
             ("1--Handshaking/a.png", (50, 30, 82, 62), (0, 0, 1, 0, 1, 0))]
    lines, truth = [], []
    for rel, box, attr in faces:
        kp = np.stack([rng.integers(box[0] + 2, box[2] - 2, 98), rng.integers(box[1] + 2, box[3] - 2, 98)], 1).astype(np.float64)
        kp[:, 0] += 0.25  # sub-pixel coordinates survive the crop exactly
        lines.append(" ".join(f"{v:.6f}" for v in kp.flatten()) + " " + " ".join(map(str, box)) + " "
                     + " ".join(map(str, attr)) + " " + rel)
        truth.append((rel, box, attr, kp))
    d = os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test")
    os.makedirs(d, exist_ok=True)
    for split in ("train", "test"):
        with open(os.path.join(d, f"list_98pt_rect_attr_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return imgs, truth


def test_wflw_reads_lines_and_crops_from_the_box(tmp_path):
    imgs, truth = write_wflw(str(tmp_path))
    ds = data.load(str(tmp_path), "test", image_size=40)
    assert ds.task == "landmarks" and ds.images.shape == (3, 3, 40, 40) and ds.keypoints.shape == (3, 98, 2)
    assert ds.norm_pair == (60, 72) and ds.attribute_names[0] == "pose" and ds.attribute_names[-1] == "blur"
    for i, (rel, box, attr, kp) in enumerate(truth):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2  # side 1.25 * 32 = 40 = size: k = 1, centre -> 20
        np.testing.assert_allclose(ds.keypoints[i].numpy(), kp - [cx, cy] + 20, atol=1e-4)
        assert ds.attributes[i].tolist() == list(attr)
        # the crop is the image shifted by (cx - 20, cy - 20): pixel (u, v) of the crop is pixel (u + dx, v + dy)
        dx, dy = int(cx - 20), int(cy - 20)
        a, crop = imgs[rel], ds.images[i].permute(1, 2, 0).numpy()
        v0, v1, u0, u1 = max(0, -dy), min(40, a.shape[0] - dy), max(0, -dx), min(40, a.shape[1] - dx)
        np.testing.assert_array_equal(crop[v0:v1, u0:u1], a[v0 + dy:v1 + dy, u0 + dx:u1 + dx])


def test_wflw_flip_pairs_and_flip_keypoints():
    pairs = data.WFLW_FLIP_PAIRS
    flat = [i for p in pairs for i in p]
    assert len(pairs) == 44 and len(set(flat)) == 88  # 98 points: 88 paired, 10 on the midline (51..54, 57, ...)
    assert (60, 72) in pairs and (96, 97) in pairs and 54 not in flat and 57 not in flat
    kp = torch.rand(2, 98, 2) * 255
    f = data.flip_keypoints(kp, 256, pairs)
    torch.testing.assert_close(f[:, 72, 0], 255 - kp[:, 60, 0])  # the right eye corner is the mirrored left one
    torch.testing.assert_close(f[:, 72, 1], kp[:, 60, 1])
    torch.testing.assert_close(f[:, 54], torch.stack([255 - kp[:, 54, 0], kp[:, 54, 1]], -1))  # the nose tip stays 54
    torch.testing.assert_close(data.flip_keypoints(f, 256, pairs), kp)


def test_loader_moves_keypoints_with_the_crop_and_flip():
    """Keypoint 0 is marked by a red pixel, keypoint 1 (its flip pair) by a green one. After the loader's crop and flip,
    keypoint 1 must sit on the green pixel when unflipped and keypoint 0 on it when flipped (the pair swapped)."""
    n, S = 64, 16
    g = torch.Generator().manual_seed(0)
    kp = torch.randint(3, S - 3, (n, 2, 2), generator=g).float()
    images = torch.zeros(n, 3, S, S, dtype=torch.uint8)
    for i in range(n):
        images[i, 0, int(kp[i, 0, 1]), int(kp[i, 0, 0])] = 255
        images[i, 1, int(kp[i, 1, 1]), int(kp[i, 1, 0])] = 255
    ds = data.Dataset(images, None, [], keypoints=kp, flip_pairs=((0, 1),))
    loader = data.Loader(ds, 16, "cpu", seed=0, crop_padding=2)
    flips = 0
    for step in range(4):
        x, y = loader.batch(step)
        for b in range(len(x)):
            green = torch.nonzero(x[b, 1] > 0.9)
            red = torch.nonzero(x[b, 0] > 0.9)
            at = lambda p: [int(p[1]), int(p[0])] in green.tolist()
            flipped = at(y[b, 0]) and not at(y[b, 1])
            flips += flipped
            assert flipped or at(y[b, 1]), (step, b)
            assert [int(y[b, 1 if flipped else 0, 1]), int(y[b, 1 if flipped else 0, 0])] in red.tolist()
    assert 0 < flips < 64  # both branches were seen


def test_dense_shapes_masks_and_keypoints():
    seg = data.load("shapes-seg", "test")
    cls = data.load("shapes", "test")
    torch.testing.assert_close(seg.images, cls.images)  # the same pictures as `shapes`
    assert seg.classes == ["background", *data.SHAPES_CLASSES]
    fg = (seg.masks > 0) & (seg.masks != data.IGNORE_INDEX)
    assert ((seg.masks[fg].long() - 1) == cls.labels[:, None, None].expand_as(seg.masks)[fg]).all()
    lm = data.load("shapes-landmarks", "test")
    assert len(lm) == 700 and lm.keypoints.shape == (700, 5, 2) and lm.keypoints.isfinite().all()
    k = lm.keypoints
    assert (k[:, 1, 0] <= k[:, 0, 0] + 0.5).all() and (k[:, 3, 1] <= k[:, 4, 1]).all()  # left of centre-ish, top above bottom

# ----------------------------------------------------------------------------------------------
# Metrics


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    m, iou, acc = rf.miou(rf.confusion_matrix(pred, target, 4))
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 2, union 3 -> 2/3; class 2: 1/1; class 3 absent: no IoU, not averaged
    assert iou[:3] == pytest.approx([0.5, 2 / 3, 1.0]) and np.isnan(iou[3])
    assert m == pytest.approx((0.5 + 2 / 3 + 1) / 3) and acc == pytest.approx(4 / 5)


def test_nme_failure_rate_and_auc_by_hand():
    gt = torch.tensor([[[0., 0.], [4., 0.], [1., 1.]], [[0., 0.], [2., 0.], [1., 1.]]])
    pred = gt.clone()
    pred[0, 0, 1] = 3.0   # one point 3 px off, normaliser 4: NME (3 + 0 + 0) / 3 / 4 = 0.25
    pred[1, 2, 0] = 1.3   # 0.3 px off, normaliser 2: 0.3 / 3 / 2 = 0.05
    nme = rf.nme_per_sample(pred, gt, (0, 1))
    torch.testing.assert_close(nme, torch.tensor([0.25, 0.05]))
    m = rf.landmark_metrics(nme)
    assert m["nme"] == pytest.approx(0.15) and m["fr_10"] == pytest.approx(0.5)
    assert m["auc_10"] == pytest.approx((0 + 0.5) / 2)  # the CED's area on [0, 0.1]: (0.1 - 0.05) / 0.1 for one of two
    # WFLW normalises by the outer eye corners, points 60 and 72
    gt98 = torch.zeros(1, 98, 2)
    gt98[0, 72, 0] = 10.0
    torch.testing.assert_close(rf.nme_per_sample(gt98 + 1.0, gt98, (60, 72)), torch.tensor([2 ** 0.5 / 10]))


def test_heatmap_targets_and_decoding():
    kp = torch.tensor([[[10.0, 6.0], [9.0, 30.0], [-40.0, 5.0]]])  # the last one's window misses the map
    t, w = rf.heatmap_targets(kp, (16, 16), stride=2.0, sigma=2.0)
    assert w.tolist() == [[1.0, 1.0, 0.0]] and t[0, 2].abs().max() == 0
    assert t[0, 0, 3, 5] == 1.0 and t[0, 0, 3, 6] == pytest.approx(np.exp(-1 / 8))  # mu = int(kp / 2 + 0.5)
    assert t[0, 0, 3, 12] == 0.0 and t[0, 0, 3, 11] > 0  # cut at 3 sigma
    assert t[0, 1, 15, 5] == 1.0  # int(9 / 2 + 0.5) = 5, int(30 / 2 + 0.5) = 15
    hm = torch.zeros(1, 1, 8, 8)
    hm[0, 0, 4, 3], hm[0, 0, 4, 4], hm[0, 0, 5, 3] = 1.0, 0.5, 0.2  # argmax (3, 4); right and lower neighbours higher
    torch.testing.assert_close(rf.decode_heatmaps(hm), torch.tensor([[[3.25, 4.25]]]))
    hm[0, 0, 4, 4] = 0.0
    hm[0, 0, 4, 2] = 0.5  # now the left neighbour is higher
    torch.testing.assert_close(rf.decode_heatmaps(hm), torch.tensor([[[2.75, 4.25]]]))


def test_flip_test_averages_the_mirrored_heatmaps():
    """A flip-equivariant net (keypoint 0 = the bright pixel in the left half, keypoint 1 = the one in the right half):
    the flip-tested prediction equals the plain one up to the one-pixel shift mmpose applies to the flipped-back
    heatmaps (+0.25 heatmap px at most); without the pair swap it would land on the other point."""
    class Net(torch.nn.Module):
        def forward(self, x):
            s = x[:, 0] + 1.0
            left = (torch.arange(16) < 8).float()
            return torch.stack([s * left, s * (1 - left)], 1)
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0, 5, 4] = 1.0
    x[0, 0, 9, 11] = 1.0
    plain = rf.predict_keypoints(Net(), x, ((0, 1),), flip_test=False)
    torch.testing.assert_close(plain, torch.tensor([[[4.0, 5.0], [11.0, 9.0]]]))
    flipped = rf.predict_keypoints(Net(), x, ((0, 1),), flip_test=True)
    assert (flipped - plain).abs().max() <= 0.25 + 1e-6

# ----------------------------------------------------------------------------------------------
# Models and stages


def test_official_model_shapes():
    seg = rf.BiSeNetV1(rf.build_student("resnet18", 64, stem="imagenet"), 19).eval()
    out = seg(torch.zeros(1, 3, 448, 448))
    assert [tuple(o.shape) for o in out] == [(1, 19, 56, 56), (1, 19, 56, 56), (1, 19, 28, 28)]
    assert seg.decode_head.convs[0].conv.weight.shape == (256, 256, 3, 3)  # mmseg's r18 config: 256-channel FCN head
    assert seg.auxiliary_head[0].convs[0].conv.weight.shape == (64, 128, 3, 3)
    lm = rf.TopDown(rf.build_student("resnet50", 64, stem="imagenet"), 98).eval()
    assert lm(torch.zeros(1, 3, 256, 256)).shape == (1, 98, 64, 64)  # 256 x 256 crops, 64 x 64 heatmaps
    assert lm.keypoint_head.deconv_layers[0].weight.shape == (2048, 256, 4, 4)


def _dense_run(stage, out, *extra):
    args = rf.build_parser().parse_args([stage, "--out-dir", str(out), "--device", "cpu", "--batch-size", "32",
                                         "--lr", "3e-3", "--ema-decay", "0.9", "--log-every", "10",
                                         "--optimizer", "adamw", "--weight-decay", "0", "--lr-steps", *extra])  # short runs: Adam
    return (rf.finetune if stage == "finetune" else rf.scratch)(args)


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


def test_seg_scratch_learns_beyond_the_majority_class(tmp_path):
    m = _dense_run("scratch", tmp_path, "--task", "seg", "--data", "shapes-seg", "--width", "8", "--steps", "100",
                   "--lr", "1e-2", "--labeled-fraction", "0.1")
    losses = _losses(tmp_path)
    assert losses[-1] < 0.7 * losses[0]
    assert m["miou"] > m["trivial"]["miou"] + 0.05, m  # 0.07: background everywhere
    assert os.path.exists(tmp_path / "masks.png") and len(m["iou"]) == 11


def test_landmarks_scratch_beats_the_mean_shape(tmp_path):
    m = _dense_run("scratch", tmp_path, "--task", "landmarks", "--data", "shapes-landmarks", "--width", "8", "--head-ch", "16",
                   "--steps", "60", "--labeled-fraction", "0.2")
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]
    assert m["nme"] < m["trivial"]["nme"], m
    assert os.path.exists(tmp_path / "landmarks.png")


def test_finetune_puts_the_distilled_student_in_the_dense_models(tmp_path):
    import ddae_probe
    ddae_probe.main(ddae_probe.build_parser().parse_args(
        ["pretrain", "--out-dir", str(tmp_path / "t"), "--model", "tiny", "--ch", "8", "--steps", "2", "--batch-size", "16",
         "--log-every", "2", "--device", "cpu"]))
    rf.distill(rf.build_parser().parse_args(
        ["distill", "--teacher", str(tmp_path / "t"), "--out-dir", str(tmp_path / "d"), "--steps", "2", "--log-every", "2",
         "--device", "cpu", "--width", "4", "--batch-size", "16", "--t-policy", "fixed", "--t", "0"]))
    from training import load_weights
    d = tmp_path / "d" / "ckpt"
    student = load_weights(str(d), rf.RepFusion(json.load(open(d / "config.json")))).student
    for task, extra in (("seg", []), ("landmarks", ["--head-ch", "8"])):
        out = tmp_path / task
        _dense_run("finetune", out, "--ckpt", str(tmp_path / "d" / "ckpt"), "--task", task, "--steps", "1", "--lr", "0",
                   "--labeled-fraction", "0.02", *extra)
        cfg = json.load(open(out / "ckpt" / "config.json"))
        model = rf.build_dense(task, "resnet18", 4, 3, "cifar", cfg["num_out"], 8)
        model = load_weights(str(out / "ckpt"), model)
        torch.testing.assert_close(model.backbone.conv1.weight, student.conv1.weight)  # lr 0: the distilled weights
        torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, student.layer4[1].conv2.weight)
    with pytest.raises(UserError, match="give the label budget as --labeled-fraction"):
        _dense_run("scratch", tmp_path / "y", "--task", "seg", "--labels-per-class", "3", "--width", "4", "--steps", "1")
    with pytest.raises(UserError, match="a landmarks data set, but --task is seg"):
        _dense_run("scratch", tmp_path / "x", "--task", "seg", "--data", "shapes-landmarks", "--width", "4", "--steps", "1")
