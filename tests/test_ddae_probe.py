"""ddae_probe.py: UNet presets and hooks, both objectives, resume, torchrun, the probe grid (cached == recomputed),
align, finetune, noisy, sample + FID over checkpoints, the DiT path, the bare pipeline and clear errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
import data
import ddae_probe as dp
import repcond_dit as rd
from data import UserError
import models
import training
from conftest import TinyFeatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--ch", "16", "--image-size", "16", "--device", "cpu"]  # ~0.28M params, 16x16 shapes
SMALL = ["--labels-per-class", "10", "--n-test", "100", "--device", "cpu"]
CACHED = ["--protocol", "cached"]  # the fast grid (the probe stage's default is the official protocol)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for these tiny tensors


def run(argv):
    return dp.main(dp.build_parser().parse_args(argv))


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


# ---------------------------------------------------------------------------------------------- model

def test_presets_have_the_papers_sizes_and_hooks_return_the_documented_shapes():
    with torch.device("meta"):  # shapes only: the 35.7M / 55.7M nets cost nothing here
        ddpm, ddpmpp = models.UNet(**cli.UNet_models["ddpm"]), models.UNet(**cli.UNet_models["ddpmpp"])
        for net in (ddpm, ddpmpp):
            raw = {}
            hooks = [net.layer(n).register_forward_hook(lambda m, i, o, n=n: raw.__setitem__(n, tuple(o.shape))) for n in net.layer_names()]
            with dp.LayerTap(net, net.layer_names()) as tap:
                assert net(torch.empty(2, 3, 32, 32), torch.empty(2)).shape == (2, 3, 32, 32)
            for h in hooks:
                h.remove()
            for name, ch, res in net.layers:
                assert tap.feats[name].shape == (2, ch) and raw[name] == (2, ch, res, res)  # pooled (N, C_layer)
    assert sum(p.numel() for p in ddpm.parameters()) == 35_746_307  # the DDPM CIFAR-10 UNet, 35.7M
    assert round(sum(p.numel() for p in ddpmpp.parameters()) / 1e6, 1) == 55.7  # EDM's DDPM++, 55.7M
    assert ddpm.layer_names()[:3] == ["down.0", "down.1", "down.2"] and "mid" in ddpm.layer_names() and len(ddpm.layers) == 27
    assert [n for n, _, r in ddpm.layers if r == 8 and n.startswith("up.")][-1] == "up.6"  # the paper's last 8x8 decoder block
    tiny = models.UNet(**cli.UNet_models["tiny"])
    assert sum(p.numel() for p in tiny.parameters()) < 2e6
    for p in tiny.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.0, 10.0, 500.0])
    with dp.LayerTap(tiny, tiny.layer_names()) as tap, torch.no_grad():
        tiny(x, t)
        for name, ch, res in tiny.layers:  # a hook's pooled activation is the truncated network's output, pooled
            assert torch.allclose(tap.feats[name], tiny.truncated(name)(x, t).mean((2, 3)), atol=1e-4)


def test_class_conditional_unet_uses_the_null_label_by_default():
    net = models.UNet(**dict(cli.UNet_models["tiny"], ch=16, image_size=16, num_classes=10))
    for p in net.parameters():  # zero-initialised convs would hide the label
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 7.0])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.full((2,), 10)))
        assert not torch.allclose(net(x, t), net(x, t, torch.tensor([0, 1])))


# ---------------------------------------------------------------------------------------------- pretrain

@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    """A tiny DDPM run on 16x16 shapes with snapshots at steps 15 and 30, probed once."""
    out = tmp_path_factory.mktemp("ddpm")
    m = run(["pretrain", "--out-dir", str(out), *TINY, "--steps", "30", "--batch-size", "32", "--lr", "2e-3",
             "--warmup", "5", "--log-every", "5", "--snapshot-every", "15"])
    p = run(["probe", "--ckpt", str(out / "ckpt"), "--out-dir", str(out / "probe"), *SMALL, *CACHED, "--t", "1", "101",
             "--views", "2", "--probe-epochs", "5", "--cache-dir", str(out / "cache")])
    return out, m, p


def test_ddpm_pretrain_loss_falls_and_checkpoints_are_complete(ddpm_run):
    out, m, _ = ddpm_run
    log = losses(out)
    assert log[-1] < 0.5 * log[0]
    cfg = json.load(open(out / "ckpt" / "config.json"))
    assert cfg["arch"] == "unet" and cfg["objective"] == "ddpm" and cfg["T"] == 1000 and cfg["beta_range"] == [1e-4, 0.02]
    assert cfg["args"]["ema_decay"] == 0.9999  # the paper's DDPM EMA when not given
    assert os.path.isdir(out / "ckpt_0000015") and os.path.isdir(out / "ckpt_0000030")
    keys = load_file(out / "ckpt" / "ema.safetensors").keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    assert m["eval_loss"] < 1.0


def test_edm_loss_falls_probe_in_sigma_and_heun_samples(tmp_path):
    out = tmp_path / "edm"
    run(["pretrain", "--out-dir", str(out), "--objective", "edm", *TINY, "--steps", "30", "--batch-size", "32",
         "--lr", "2e-3", "--warmup", "5", "--log-every", "5"])
    log = losses(out)
    assert log[-1] < 0.7 * log[0]
    assert json.load(open(out / "ckpt" / "config.json"))["args"]["ema_decay"] == 0.9993
    p = run(["probe", "--ckpt", str(out / "ckpt"), "--out-dir", str(tmp_path / "p"), *SMALL, "--t", "0.06", "1.5",
             "--layers", "mid", "up.0", "--views", "1", "--probe-epochs", "3"])
    assert p["t_means"] == "sigma" and p["probe_best_t"] in (0.06, 1.5)
    s = run(["sample", "--ckpt", str(out / "ckpt"), "--out-dir", str(tmp_path / "s"), "--n-images", "4", "--sample-steps", "4",
             "--device", "cpu"])
    assert s["objective"] == "edm" and (tmp_path / "s" / "samples.png").exists()


def test_edm_preconditioning_and_heun_on_a_perfect_denoiser():
    obj = models.EDMObjective()
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = obj.precond(sigma)
    assert torch.allclose(c_skip, 0.25 / (sigma ** 2 + 0.25)) and torch.allclose(c_out ** 2, 0.25 * sigma ** 2 / (sigma ** 2 + 0.25))
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + 0.25), torch.ones(3)) and torch.allclose(c_noise, sigma.log() / 4)
    # a network whose D(x; sigma) is exactly a fixed image x0 makes Heun land on x0
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1

    class Oracle(torch.nn.Module):
        def forward(self, x_in, c_noise, y=None):
            s = (4 * c_noise).exp().view(-1, 1, 1, 1)
            cs, co, ci, _ = obj.precond(s.flatten())
            x = x_in / ci.view(-1, 1, 1, 1)
            return (x0 - cs.view(-1, 1, 1, 1) * x) / co.view(-1, 1, 1, 1)
    out = obj.sample(Oracle(), (1, 3, 4, 4), torch.Generator().manual_seed(0), steps=6)
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddpm_ablation_flags_reach_the_schedule(tmp_path):
    out = tmp_path / "t64"
    run(["pretrain", "--out-dir", str(out), *TINY, "--T", "64", "--beta-range", "0.01", "0.02", "--steps", "2",
         "--batch-size", "16", "--log-every", "1"])
    obj = models.make_objective(json.load(open(out / "ckpt" / "config.json")))
    assert obj.T == 64 and obj.default_levels()[-1] < 64
    betas = 1 - obj.diffusion.alphas_cumprod[1:] / obj.diffusion.alphas_cumprod[:-1]
    assert betas[0].item() == pytest.approx(0.01 + 0.01 / 63, rel=1e-3) and betas[-1].item() == pytest.approx(0.02, rel=1e-3)
    with pytest.raises(UserError, match="--t"):
        obj.check_levels([64])


def test_the_typed_t_is_the_papers_t_counted_from_1_as_the_official_code():
    """DDAE's DDPM.perturb: beta_t = [0, beta_1..beta_T], alphabar_t[t] = cumprod(1 - beta_t)[t], t in [1, T]. The level our
    UNet backbones use for a typed t is that alphabar: schedule index t - 1 (the official t = 11 is index 10)."""
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)])
    official_abar = torch.cumprod(1 - beta, 0)  # DDAE's schedules(..., 'DDPM')["alphabar_t"], index = the official t
    net = models.UNet(**dict(cli.UNet_models["tiny"], ch=16))
    obj = models.make_objective({"objective": "ddpm"}, first_t=dp.paper_first_t(net))
    assert obj.first_t == 1 and obj.check_levels([1, 11, 1000]) == [1, 11, 1000]
    x0, eps = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    for t in (1, 11, 21, 500, 1000):
        x, cond = obj.net_input(x0, torch.tensor([float(t)]), eps)
        assert abs(x.item() - official_abar[t].sqrt().item()) < 1e-6 and cond.item() == t - 1  # index t - 1 conditions the net
    assert obj.default_levels()[:3] == [1, 11, 21]  # the official grid (linear.py --grid: [1, 11, 21])
    with pytest.raises(UserError, match="counted from 1"):
        obj.check_levels([0])
    g = torch.Generator().manual_seed(0)
    lv = obj.random_levels(g, 4096, training.Dist())
    assert lv.min() >= 1 and lv.max() <= 1000  # the official training draw t ~ U[1, T]
    # a DiT keeps DiT's 0-based index (the official DiT/linear.py passes t to DiT's q_sample as is)
    assert models.make_objective({"objective": "ddpm"}).first_t == 0


def test_pretrain_defaults_follow_the_official_configs(tmp_path):
    """config/*.yaml + train.py on 4 GPUs: DDPM batch 128/GPU at 1e-4 x 4 with 13 warm-up epochs; EDM DDPM++ batch 64/GPU at
    1e-4 x 4 with 200 warm-up epochs (10 Mimg) and dropout 0.13; DDPM++ under the DDPM objective dropout 0.1."""
    lr, warm, drop = dp.official_pretrain_defaults("ddpm", "ddpm", 512, 50_000)
    assert lr == pytest.approx(4e-4) and warm == 1270 and drop == 0.1
    lr, warm, drop = dp.official_pretrain_defaults("edm", "ddpmpp", 256, 50_000)
    assert lr == pytest.approx(4e-4) and warm * 256 == pytest.approx(10e6, rel=1e-4) and drop == 0.13
    assert dp.official_pretrain_defaults("ddpm", "ddpmpp", 256, 50_000) == (pytest.approx(4e-4), 2540, 0.1)
    run(["pretrain", "--out-dir", str(tmp_path), *TINY, "--steps", "1", "--batch-size", "16", "--log-every", "1"])
    a = json.load(open(tmp_path / "ckpt" / "config.json"))["args"]
    assert a["lr"] == pytest.approx(16e-4 / 128) and a["warmup"] == math.ceil(13 * 5000 / 16)  # shapes: 5000 train images


def test_resume_is_exact_with_dropout(tmp_path):
    common = [*TINY, "--dropout", "0.1", "--batch-size", "8", "--log-every", "2", "--ckpt-every", "4", "--warmup", "3"]
    run(["pretrain", "--out-dir", str(tmp_path / "full"), *common, "--steps", "8"])
    run(["pretrain", "--out-dir", str(tmp_path / "half"), *common, "--steps", "4"])
    run(["pretrain", "--out-dir", str(tmp_path / "half"), *common, "--steps", "8", "--resume"])
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(tmp_path / "full" / "ckpt" / f), load_file(tmp_path / "half" / "ckpt" / f)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- probe

def test_probe_writes_the_grid_and_cached_features_equal_recomputed_ones(ddpm_run):
    out, _, p = ddpm_run
    grid = json.load(open(out / "probe" / "grid.json"))
    names = models.UNet(**json.load(open(out / "ckpt" / "config.json"))["unet"]).layer_names()
    assert grid["layers"] == names == p["layers"] and grid["t"] == [1, 101]
    assert len(grid["accuracy"]) == len(names) and all(len(r) == 2 for r in grid["accuracy"])
    assert (out / "probe" / "heatmap.png").exists() and open(out / "probe" / "grid.csv").readline().strip() == "layer,1,101"
    for k in ("probe_best_acc", "probe_best_layer", "probe_best_t", "raw_pixel_acc", "chance"):
        assert k in json.load(open(out / "probe" / "metrics.json"))
    assert p["probe_best_acc"] == max(max(r) for r in grid["accuracy"]) > p["chance"]
    assert len(os.listdir(out / "cache")) == 2 * 3  # (train view 0, 1, test) x 2 levels
    # one cell recomputed from scratch: its own forward pass (one layer hooked), one head trained alone
    args = dp.build_parser().parse_args(["probe", "--ckpt", str(out / "ckpt"), *SMALL, *CACHED, "--probe-epochs", "5"])
    dist = training.setup_distributed("cpu")
    net, obj, space, train, test, _ = dp.load_backbone(args, dist)
    train, test = dp._labeled_sets(args, train, test)
    i, layer, level = 7, names[7], 101
    tr = [dp.extract_features(net, obj, space, train, level, [layer], 0, dist, 256, v)[layer] for v in range(2)]
    te = dp.extract_features(net, obj, space, test, level, [layer], dp.TEST_SEED, dist, 256, 0)[layer]
    acc = dp.train_linear_heads([[f] for f in tr], train.labels, [te], test.labels, 10, epochs=5)[0].item()
    assert acc == grid["accuracy"][i][1]
    # a second run reads the cache (same figures)
    again = run(["probe", "--ckpt", str(out / "ckpt"), "--out-dir", str(out / "probe2"), *SMALL, *CACHED, "--t", "1", "101",
                 "--views", "2", "--probe-epochs", "5", "--cache-dir", str(out / "cache"), "--no-raw-pixel"])
    assert again["probe_best_acc"] == p["probe_best_acc"] and again["raw_pixel_acc"] is None


def test_official_crop_is_zero_padding_4_then_crop_and_flip():
    """torchvision's RandomCrop(32, padding=4) (fill 0) + RandomHorizontalFlip, as DDAE's official datasets.py."""
    x = torch.randint(1, 256, (5, 3, 8, 8), dtype=torch.uint8)
    shift, flip = torch.tensor([[0, 0], [8, 8], [4, 4], [1, 7], [6, 2]]), torch.tensor([True, False, True, False, True])
    out = data.crop_flip(x, shift, flip, 4, zeros=True)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # zeros
    for i in range(5):
        ref = padded[i, :, shift[i, 0]:shift[i, 0] + 8, shift[i, 1]:shift[i, 1] + 8]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


def test_official_linear_probe_is_nn_linear_adam_and_cosine_per_epoch():
    """The official protocol equals linear.py written out: nn.Linear with default init (same seed), Adam(lr), a
    CosineAnnealingLR(T_max=epochs) stepped once per epoch, batches of 16 per process with the last short one kept."""
    ds = data.load("shapes", "train", 8).subset(torch.arange(40))
    space = dp.Space(ds, None, "cpu", "none")
    args = dp.build_parser().parse_args(["probe", "--probe-epochs", "3", "--probe-lr", "1e-2", "--probe-batch-size", "16"])
    dist = training.Dist()
    feat = lambda z0, g: [z0.flatten(1)[:, :20] * 3]  # noqa: E731
    te = torch.randn(10, 20)
    acc, heads = dp.official_linear_probe(feat, [20], space, ds, [te], torch.zeros(10, dtype=torch.long), ds.num_classes, args, dist, 5)
    torch.manual_seed(5)
    ref = torch.nn.Linear(20, ds.num_classes)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3)
    sizes = []
    for e in range(3):
        for x, y in dp._official_batches(ds, e, 5, 16, dist):
            loss = torch.nn.functional.cross_entropy(ref(feat(space.encode(x, generator=False), None)[0]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sizes.append(len(y))
        sched.step()
    assert sizes[:3] == [16, 16, 8]  # 40 images: the last short batch is kept (DistributedSampler, no drop_last)
    assert torch.allclose(heads[0].weight, ref.weight, atol=1e-6) and torch.allclose(heads[0].bias, ref.bias, atol=1e-6)
    assert acc[0].item() == (ref(te).argmax(1) == 0).float().mean().item()


def test_heads_trained_together_equal_heads_trained_alone():
    g = torch.Generator().manual_seed(0)
    y, yt = torch.arange(60) % 3, torch.arange(30) % 3
    feats = [torch.randn(60, d, generator=g) + y[:, None] * 0.5 for d in (5, 9, 2)]
    tests = [torch.randn(30, d, generator=g) + yt[:, None] * 0.5 for d in (5, 9, 2)]
    together = dp.train_linear_heads([feats], y, tests, yt, 3, epochs=4, batch_size=16)
    alone = [dp.train_linear_heads([[f]], y, [t], yt, 3, epochs=4, batch_size=16)[0] for f, t in zip(feats, tests)]
    assert together.tolist() == [a.item() for a in alone]


def test_bench_grid_is_faster_than_one_run_per_cell_and_agrees(ddpm_run):
    out, _, _ = ddpm_run
    r = dp.bench_grid(str(out / "ckpt"), layers=["down.1", "mid", "up.2"], t=[1, 101], labels_per_class=5, n_test=50, probe_epochs=3)
    assert r["cells"] == 6 and r["max_abs_acc_diff"] == 0.0 and r["ratio"] > 1.2


# ---------------------------------------------------------------------------------------------- align, finetune, noisy

def test_align_metrics_are_bounded_and_ranked_against_the_grid(ddpm_run, tmp_path):
    out, _, _ = ddpm_run
    m = run(["align", "--ckpt", str(out / "ckpt"), "--grid", str(out / "probe" / "grid.json"), "--n-images", "64",
             "--out-dir", str(tmp_path), "--device", "cpu"])
    a = json.load(open(tmp_path / "align.json"))
    A, U = torch.tensor(a["alignment"]), torch.tensor(a["uniformity"])
    assert A.shape == U.shape == (14, 2) and (A >= 0).all() and (A <= 4).all() and (U <= 0).all() and (U >= -4).all()
    assert (A[:, 0] < A[:, 1]).float().mean() > 0.5  # less noise: closer positive pairs, for most layers
    for k in ("spearman_alignment", "spearman_uniformity", "spearman_align_plus_uniform"):
        assert m[k] is None or -1 <= m[k] <= 1
    assert set(m["spearman_per_t"]) == {"1", "101"} and (tmp_path / "alignment.png").exists()
    Ub = torch.tensor(a["uniformity_per_batch"])
    assert Ub.shape == (14, 2) and (Ub <= 0).all() and "chunked" in a["estimators"]["uniformity"]


def test_uniformity_chunked_equals_pdist_and_the_per_batch_estimator_is_the_official_one():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(a + 0.1 * torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    ref = torch.pdist(a).pow(2).mul(-2).exp().mean().log().item()
    for chunk in (300, 1000, 1 << 24):  # 1 row, 3 rows, everything per chunk
        assert abs(dp.uniformity_all_pairs(a, chunk_elems=chunk) - ref) < 1e-9
    # contrastive.py: batches of 128 in order, (U(x_b) + U(y_b)) / 2 weighted by the batch size (128, 128, 44)
    u = lambda x: torch.pdist(x).pow(2).mul(-2).exp().mean().log().item()  # noqa: E731
    want = sum(n * (u(a[s:s + n]) + u(b[s:s + n])) / 2 for s, n in ((0, 128), (128, 128), (256, 44))) / 300
    assert abs(dp.uniformity_per_batch(a, b, 128) - want) < 1e-12


def test_finetune_from_pretrained_and_from_scratch(ddpm_run, tmp_path):
    out, _, _ = ddpm_run
    m = run(["finetune", "--ckpt", str(out / "ckpt"), "--grid", str(out / "probe" / "grid.json"), "--out-dir", str(tmp_path),
             *SMALL, "--steps", "12", "--batch-size", "20", "--lr", "1e-3", "--warmup", "0", "--log-every", "4"])
    best = json.load(open(out / "probe" / "grid.json"))["best"]
    assert m["layer"] == best["layer"] and m["t"] == best["t"]
    assert 0 <= m["finetune_acc"] <= 1 and 0 <= m["scratch_acc"] <= 1
    pre = load_file(out / "ckpt" / "ema.safetensors")
    ft, sc = (load_file(tmp_path / n / "ckpt" / "model.safetensors") for n in ("finetune", "scratch"))
    k = "trunk.stem.weight"
    # fine-tuning starts from the DDAE (a small step away from it), scratch from a fresh init
    assert (ft[k] - pre["stem.weight"]).norm() < (sc[k] - pre["stem.weight"]).norm()
    assert not any(n.startswith("trunk.out_conv") for n in ft)  # truncated: nothing after the layer
    assert losses(tmp_path / "finetune")[-1] < losses(tmp_path / "finetune")[0]


def test_noisy_classifier_per_noise_level(ddpm_run, tmp_path):
    out, _, _ = ddpm_run
    m = run(["noisy", "--ckpt", str(out / "ckpt"), "--layer", "mid", "--out-dir", str(tmp_path), *SMALL,
             "--steps", "30", "--batch-size", "20", "--log-every", "10", "--t", "1", "500", "1000"])
    j = json.load(open(tmp_path / "noisy.json"))
    assert j["t"] == [1, 500, 1000] and len(j["accuracy"]) == 3 and (tmp_path / "noisy_curve.png").exists()
    assert j["official_t"] == [1, 500, 1000]
    sd = load_file(tmp_path / "ckpt" / "model.safetensors")
    pre = load_file(out / "ckpt" / "ema.safetensors")
    assert torch.equal(sd["trunk.stem.weight"], pre["stem.weight"])  # the DDAE stays frozen
    assert losses(tmp_path)[-1] < losses(tmp_path)[0]


# ---------------------------------------------------------------------------------------------- sample, FID

def test_noisy_classifier_time_embedding_and_levels_are_the_official_ones():
    """noisy_classifier_DDAE.py: x + TimeEmbedding(dim)(t) on the raw t, TimeEmbedding written out from model/block.py;
    EDM's t indexes the 18 Heun sigmas (t = 1: sigma_min)."""
    net = models.UNet(**dict(cli.UNet_models["tiny"], ch=16))
    m = dp.NoisyClassifier(net.truncated("mid"), 10)
    d = net.layers[[n for n, _, _ in net.layers].index("mid")][1]
    t = torch.tensor([1.0, 11.0, 500.0, 1000.0])
    half = d // 8  # TimeEmbedding.forward: half_dim = n_channels // 8, log(10000) / (half_dim - 1), cat(sin, cos)
    e = t[:, None] * torch.exp(torch.arange(half) * -(math.log(10_000) / (half - 1)))[None]
    emb = torch.cat((e.sin(), e.cos()), dim=1)
    lin1, lin2 = m.tau[0], m.tau[2]
    want = lin2(torch.nn.functional.silu(lin1(emb)))
    got = m.tau(models.timestep_embedding(t, m.emb_dim, sin_first=True, freq_shift=1))
    assert lin1.in_features == d // 4 and lin2.out_features == d and (got - want).abs().max().item() < 1e-6
    assert [type(x) for x in m.mlp] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear] and m.mlp[0].out_features == 2 * d
    assert torch.equal(m.mu, torch.zeros(d)) and torch.equal(m.sd, torch.ones(d))  # raw features
    edm = models.EDMObjective()
    i = torch.arange(18, dtype=torch.float64)  # EDM.sample_schedule(18), sigma_max -> sigma_min
    sched = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(dp.heun_sigmas(edm), sched.flip(0))
    assert torch.allclose(dp.official_t(edm, sched.flip(0).float()), torch.arange(1, 19).float(), atol=1e-4)
    ddpm = models.make_objective({"objective": "ddpm"}, first_t=1)
    assert torch.equal(dp.official_t(ddpm, torch.tensor([11.0])), torch.tensor([11.0]))


def test_sample_fid_over_checkpoints_against_probe_accuracy(ddpm_run, tmp_path):
    out, _, _ = ddpm_run
    args = dp.build_parser().parse_args(
        ["sample", "--ckpts", str(out / "ckpt_0000015"), str(out / "ckpt_0000030"), "--out-dir", str(tmp_path), "--fid",
         "--n-fid", "80", "--batch-size", "40", "--sampler", "ddim", "--sample-steps", "5", "--probe", "--t", "1",
         "--layers", "mid", "up.1", "--views", "1", "--probe-epochs", "2", "--labels-per-class", "5", "--n-test", "50",
         "--device", "cpu"])
    m = dp.sample(args, feature_extractor=TinyFeatures())
    rows = m["rows"]
    assert [r["step"] for r in rows] == [15, 30] and all(r["fid"] >= 0 for r in rows)
    assert all(r["fid_reference"] == "train split" and r["fid_n_reference"] == 80 for r in rows)  # DDAE/EDM: the training images
    assert all(0 <= r["probe_best_acc"] <= 1 for r in rows) and "spearman_fid_vs_probe" in m
    assert open(tmp_path / "fid_vs_probe.csv").readline().strip() == "step,fid,probe_best_acc,probe_best_layer,probe_best_t,ckpt"
    assert (tmp_path / "ckpt0" / "samples.png").exists() and (tmp_path / "fid.png").exists()


def test_ddpm_ancestral_sampling_is_ho_et_al_with_sigma_squared_beta():
    """DDAE's DDPM.sample written out (T = 10): x_{i-1} = 1/sqrt(alpha_i) (x_i - beta_i / sqrt(1 - abar_i) eps) + sqrt(beta_i) z,
    no noise at the last step, x0 clipped to [-1, 1] first (pred_eps_). Same generator draws in the same order."""
    T, shape = 10, (2, 3, 4, 4)
    diffusion = models.Diffusion(T, 0.01, 0.2, scale_to_T=False)
    eps_fn = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # noqa: E731
    got = models.sample_loop(eps_fn, shape, diffusion, T, "ddpm", generator=torch.Generator().manual_seed(0), clip=1.0, variance="beta")
    abar = diffusion.alphas_cumprod.double()
    beta = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).double()
    for i in range(T - 1, -1, -1):
        eps = eps_fn(x.float(), torch.full((2,), i)).double()
        x0 = ((x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()).clamp(-1, 1)
        eps = (x - abar[i].sqrt() * x0) / (1 - abar[i]).sqrt()
        z = torch.randn(shape, generator=g).double()
        x = (x - beta[i] / (1 - abar[i]).sqrt() * eps) / (1 - beta[i]).sqrt() + (beta[i].sqrt() * z if i > 0 else 0)
    assert (got.double() - x).abs().max().item() < 1e-4
    post = models.sample_loop(eps_fn, shape, diffusion, T, "ddpm", generator=torch.Generator().manual_seed(0), clip=1.0)
    assert (post.double() - x).abs().max().item() > 1e-3  # the posterior variance is a different sampler
    assert dp.build_parser().parse_args(["sample"]).variance == "beta"


# ---------------------------------------------------------------------------------------------- DiT

def _latents_file(path, n=40, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    mean = torch.randn(n, 4, size, size, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    t = {"mean": mean.half(), "std": torch.full_like(mean, 0.1).half(), "mean_flip": mean.flip(3).half(),
         "std_flip": torch.full_like(mean, 0.1).half(), "labels": y}
    save_file(t, path, metadata={"format": "repcond-latents-v1", "scaling_factor": "0.18215",
                                 "classes": json.dumps(["a", "b", "c", "d"]), "image_size": str(8 * size), "source": "test"})


def test_dit_path_official_raw_state_dict_gives_per_block_features(tmp_path):
    torch.manual_seed(0)
    dit = models.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=1, num_classes=10, learn_sigma=True)
    for p in dit.parameters():  # adaLN-Zero would make every block the identity
        torch.nn.init.normal_(p, std=0.05)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")  # the release's format: a raw state dict
    _latents_file(str(tmp_path / "lat.safetensors"))
    args = dp.build_parser().parse_args(["probe", "--ckpt", str(tmp_path / "dit.pt"), "--data", str(tmp_path / "lat.safetensors"),
                                         "--test-data", str(tmp_path / "lat.safetensors"), "--device", "cpu"])
    dist = training.setup_distributed("cpu")
    net, obj, space, train, test, _ = dp.load_backbone(args, dist)
    assert net.layer_names() == ["blocks.0", "blocks.1", "blocks.2"] and obj.kind == "ddpm" and obj.T == 1000
    f = dp.extract_features(net, obj, space, train, 10, net.layer_names(), 0, dist, view=1)
    assert all(f[n].shape == (40, 32) for n in net.layer_names())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():  # unconditional use of a class-conditional DiT: the null label
        assert torch.allclose(net(x, t), dit(x, t, y=torch.full((2,), 10))[:, :4], atol=1e-6)
    m = run(["probe", "--ckpt", str(tmp_path / "dit.pt"), "--data", str(tmp_path / "lat.safetensors"), "--test-data",
             str(tmp_path / "lat.safetensors"), "--t", "10", "500", "--views", "2", "--probe-epochs", "3",
             "--out-dir", str(tmp_path / "p"), "--device", "cpu"])
    assert m["layers"] == ["blocks.0", "blocks.1", "blocks.2"] and m["chance"] == 0.25
    ft = run(["finetune", "--ckpt", str(tmp_path / "dit.pt"), "--data", str(tmp_path / "lat.safetensors"), "--test-data",
              str(tmp_path / "lat.safetensors"), "--layer", "blocks.1", "--t", "50", "--steps", "3", "--batch-size", "8",
              "--labels-per-class", "5", "--log-every", "1", "--out-dir", str(tmp_path / "ft"), "--device", "cpu"])
    assert 0 <= ft["finetune_acc"] <= 1 and 0 <= ft["scratch_acc"] <= 1
    assert not any(k.startswith("trunk.dit.blocks.2") for k in load_file(tmp_path / "ft" / "scratch" / "ckpt" / "model.safetensors"))
    with pytest.raises(UserError, match="--test-data"):  # a latents file holds one split
        run(["probe", "--ckpt", str(tmp_path / "dit.pt"), "--data", str(tmp_path / "lat.safetensors"), "--device", "cpu"])


def test_a_repcond_dit_checkpoint_is_probed_per_block(tmp_path):
    rd.main(rd.build_parser().parse_args(["pretrain", "--out-dir", str(tmp_path / "rc"), "--model", "DiT-XS/8", "--cond", "none",
                                          "--steps", "2", "--batch-size", "8", "--log-every", "1", "--device", "cpu"]))
    m = run(["probe", "--ckpt", str(tmp_path / "rc" / "ckpt"), "--out-dir", str(tmp_path / "p"), *SMALL, "--t", "50",
             "--views", "1", "--probe-epochs", "2", "--no-raw-pixel"])
    assert m["layers"] == [f"blocks.{i}" for i in range(4)] and m["objective"] == "ddpm"


# ---------------------------------------------------------------------------------------------- pipeline, errors

def test_bare_pipeline_writes_the_documented_metrics(tmp_path):
    m = run(["--out-dir", str(tmp_path), "--steps", "10", "--batch-size", "16", "--image-size", "16", "--labels-per-class", "5",
             "--n-test", "50", "--t", "1", "101", "--views", "1", "--device", "cpu"])
    saved = json.load(open(tmp_path / "metrics.json"))
    for k in ("probe_best_acc", "probe_best_layer", "probe_best_t", "raw_pixel_acc", "chance", "pretrain_eval_loss", "total_s"):
        assert k in saved and saved[k] == m[k]
    assert saved["chance"] == 0.1 and (tmp_path / "probe" / "heatmap.png").exists()


def test_clear_errors(tmp_path, ddpm_run):
    out, _, _ = ddpm_run
    with pytest.raises(UserError, match="no checkpoint here"):
        run(["probe", "--ckpt", str(tmp_path / "nope"), "--device", "cpu"])
    with pytest.raises(UserError, match="--layers"):
        run(["probe", "--ckpt", str(out / "ckpt"), "--layers", "up.99", "--device", "cpu"])
    with pytest.raises(UserError, match="ddpm timesteps"):
        run(["probe", "--ckpt", str(out / "ckpt"), "--t", "1001", "--device", "cpu"])
    with pytest.raises(UserError, match="counted from 1"):  # the paper's t: 0 is not a DDAE timestep
        run(["probe", "--ckpt", str(out / "ckpt"), "--t", "0", "--device", "cpu"])
    with pytest.raises(UserError, match="--layer NAME"):
        run(["finetune", "--ckpt", str(out / "ckpt"), "--device", "cpu", "--steps", "1"])
    with pytest.raises(UserError, match="network takes"):
        run(["probe", "--ckpt", str(out / "ckpt"), "--image-size", "32", "--device", "cpu"])
    r = subprocess.run([sys.executable, "ddae_probe.py", "probe", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: pass --ckpt") and len(r.stderr.strip().splitlines()) == 1
