"""diffusion_classifier.py: paired noise, stage reuse, official DiT files, the ddae UNet, resume + shards,
the sequential test, calibration, and accuracy above chance on `shapes` with a quickly trained DiT."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import cli
import data
import diffusion_classifier as dc

from data import UserError
import models
import training
import vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "tests", "reference", "dit_official_keys.json")  # the official release's key names and shapes


def run(argv):
    return dc.main(dc.build_parser().parse_args(argv))


def images_ds(n=6, K=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.Dataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.arange(n) % K, [f"c{k}" for k in range(K)])


class Recorder(nn.Module):
    """A class-conditional 'denoiser' that records every input it sees and answers a class-dependent guess."""
    def __init__(self, K):
        super().__init__()
        self.K, self.seen = K, []

    def forward(self, x, t, y):
        self.seen += [(x[i].clone(), int(t[i]), int(y[i])) for i in range(len(x))]
        return 0.5 * x + 0.1 * y.float().view(-1, 1, 1, 1)


def random_dit(K=3, size=8, C=3, seed=0):
    """A tiny DiT with random (not adaLN-zero) weights, so every class gives a different eps."""
    torch.manual_seed(seed)
    dit = models.DiT(input_size=size, in_channels=C, num_classes=K, learn_sigma=False, **cli.DiT_models["DiT-XS/4"])
    for p in dit.parameters():
        p.data.normal_(0, 0.05)
    return dit.eval()


def run_images(den, ds, policy, M, seed=0, batch_size=4, max_batch=7):
    diffusion = models.Diffusion(1000)
    grid = dc.timestep_grid(1000, M)
    space = vae.Space(ds, None, torch.device("cpu"))
    ef = dc.ErrorFn(den, diffusion, grid, max_batch=max_batch)
    r = dc.classify_images(ef, space, ds, range(len(ds)), policy, M, den.num_classes, seed, 0, batch_size, None, torch.device("cpu"))
    return r, ef


# ---------------------------------------------------------------------------------------------- the estimator

def test_paired_noise_every_class_sees_the_same_noisy_input():
    K, M, ds = 4, 5, images_ds(n=6, K=4)
    rec = Recorder(K)
    den = dc.Denoiser(rec, K, (3, 8, 8))
    r, ef = run_images(den, ds, dc.full_policy(M), M)
    assert ef.passes == len(rec.seen) == len(ds) * K * M and (r["nfe"] == K * M).all()
    groups = {}
    for x, t, y in rec.seen:
        groups.setdefault((t, x.numpy().tobytes()), []).append(y)
    assert len(groups) == len(ds) * M  # one noisy input per (image, slot), ...
    assert all(sorted(ys) == list(range(K)) for ys in groups.values())  # ... shared by every class
    assert sorted({t for t, _ in groups}) == dc.timestep_grid(1000, M) == [100, 300, 500, 700, 900]
    # re-running draws the same noise (a pure function of seed and image index); another seed does not
    r2, _ = run_images(dc.Denoiser(Recorder(K), K, (3, 8, 8)), ds, dc.full_policy(M), M)
    r3, _ = run_images(dc.Denoiser(Recorder(K), K, (3, 8, 8)), ds, dc.full_policy(M), M, seed=1)
    assert torch.equal(r["E"], r2["E"]) and not torch.allclose(r["E"], r3["E"])


def test_stages_that_prune_nothing_equal_the_exhaustive_schedule_and_reuse_errors():
    K, M, ds = 3, 8, images_ds(n=6, K=3)
    den = dc.Denoiser(random_dit(K), K, (3, 8, 8))
    full, ef_full = run_images(den, ds, dc.full_policy(M), M)
    same, ef_same = run_images(den, ds, dc.paper_policy(M, [2, 4, 8], [K, K, K]), M)
    assert torch.equal(same["pred"], full["pred"]) and (same["nfe"] == K * M).all()
    assert torch.allclose(same["E"], full["E"], rtol=1e-5, atol=1e-7) and ef_same.passes == ef_full.passes
    # stage 2 evaluates only the slots stage 1 did not, for the 2 kept classes: K*2 + 2*6 passes, same errors
    pruned, ef = run_images(den, ds, dc.paper_policy(M, [2, 8], [2, 1]), M)
    assert (pruned["nfe"] == K * 2 + 2 * 6).all() and ef.passes == len(ds) * (K * 2 + 2 * 6)
    seen = ~pruned["E"].isnan()
    assert torch.allclose(pruned["E"][seen], full["E"][seen], rtol=1e-5, atol=1e-7)
    assert (seen.sum(2).sort(1).values == torch.tensor([2, 8, 8])).all()  # the kept classes got every slot
    assert (pruned["pred"] == full["E"][:, :, :].where(seen, torch.tensor(float("inf"))).mean(2).argmin(1)).all()


def test_the_batched_path_computes_algorithm_1_as_written():
    """The fast path (every image, class and timestep in flat batched forwards) against the paper's loop, one
    image and one class at a time with the same paired noise: same errors, same survivors, same predictions."""
    K, M, ds = 4, 8, images_ds(n=5, K=4)
    den = dc.Denoiser(random_dit(K), K, (3, 8, 8))
    n_samples, to_keep = [2, 8], [2, 1]
    fast, _ = run_images(den, ds, dc.paper_policy(M, n_samples, to_keep), M)
    diffusion, grid = models.Diffusion(1000), dc.timestep_grid(1000, M)
    z0 = dc.load_z0(ds, range(len(ds)), vae.Space(ds, None, torch.device("cpu")), torch.device("cpu"))
    for i in range(len(ds)):
        noise = dc.slot_noise((3, 8, 8), M, 0, 0, i, "cpu")  # what classify_images drew for image i
        pred, errors = dc.algorithm1(den, diffusion, z0[i], grid, noise, n_samples, to_keep, range(K))
        assert pred == int(fast["pred"][i])
        loop = torch.stack([errors[c] for c in range(K)])  # (K, M), NaN where the loop did not evaluate
        assert torch.equal(loop.isnan(), fast["E"][i].isnan())  # the same (class, slot) pairs were evaluated
        seen = ~loop.isnan()
        assert torch.allclose(loop[seen], fast["E"][i][seen], rtol=1e-4, atol=1e-6)


def test_official_release_stage_subsets_and_costs():
    pol = dc.paper_policy(500, [50, 500], [5, 1])
    grid = dc.timestep_grid(1000, 500)
    assert grid[:3] == [1, 3, 5] and [grid[j] for j in pol.order[:3]] == [11, 31, 51] and len(pol.order) == 500
    r = dc.simulate(torch.rand(3, 10, 500), pol)
    assert (r["nfe"] == 10 * 50 + 5 * 450).all()  # 2,750 passes per CIFAR-10 image, as the official release


def test_sequential_test_stops_early_and_keeps_the_true_class():
    g = torch.Generator().manual_seed(0)
    N, K, M = 64, 10, 32
    slot = torch.rand(1, 1, M, generator=g) * 2  # timestep effects shared by every class (what pairing cancels)
    E = slot + 0.05 * torch.randn(N, K, M, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    E[torch.arange(N), y] -= 0.1  # the true class is better, by less than the spread of the errors over t
    full = dc.simulate(E, dc.full_policy(M))
    seq = dc.simulate(E, dc.paper_policy(M, [M], [1], alpha=0.05))
    assert (full["pred"] == y).all() and (seq["pred"] == y).all()
    assert seq["nfe"].float().mean() < 0.5 * full["nfe"].float().mean()
    assert abs(dc.t_quantile(0.025, 10) - 2.228) < 1e-3 and abs(dc.t_quantile(0.005, 1) - 63.657) < 1e-2


def test_auto_schedule_is_cheaper_and_as_accurate_on_validation():
    g = torch.Generator().manual_seed(1)
    N, K, M = 80, 5, 16
    E = torch.rand(1, 1, M, generator=g) + 0.3 * torch.randn(N, K, M, generator=g)
    y = torch.arange(N) % K
    E[torch.arange(N), y, 3:6] -= 0.6  # only slots 3..5 carry the class
    pol, info = dc.search_policy(E, y, log=lambda *a: None)
    assert info["val_accuracy"] >= info["val_accuracy_full"] and info["val_nfe"] < info["val_nfe_full"] / 2
    assert set(pol.order[:2]) <= {3, 4, 5}


def test_tau_fit_calibrates_overconfident_scores():
    g = torch.Generator().manual_seed(0)
    N, K = 400, 5
    y = torch.randint(0, K, (N,), generator=g)
    logits = torch.randn(N, K, generator=g)
    logits[torch.arange(N), y] += 1.0
    y = torch.where(torch.rand(N, generator=g) < 0.3, torch.randint(0, K, (N,), generator=g), y)  # label noise
    delta = (logits.max(1, keepdim=True).values - logits) * 0.01  # errors on a tiny scale: softmax(-delta) ~ uniform
    nll_raw, _ = dc.nll_ece(dc.class_probs(delta, 1.0), y)
    tau = dc.fit_tau(delta, y)
    nll, ece = dc.nll_ece(dc.class_probs(delta, tau), y)
    assert 0.001 < tau < 0.1 and nll < nll_raw - 0.05 and ece < 0.1
    assert dc.nll_ece(torch.eye(3), torch.tensor([0, 1, 2])) == (pytest.approx(0.0, abs=1e-6), 0.0)


# ---------------------------------------------------------------------------------------------- denoisers

def _official_file(tmp_path, name):
    """Random fp32 weights with the release's names and shapes, raw state dict. Blocks share block 0's tensors
    (torch.save writes a shared storage once), so the 675M-parameter XL/2 file stays ~100 MB."""
    ref = json.load(open(REF))[name]
    g, sd = torch.Generator().manual_seed(0), {}
    for k, shape in ref.items():
        p = k.split(".")
        first = ".".join(["blocks", "0", *p[2:]]) if p[0] == "blocks" else k
        sd[k] = sd[first] if first in sd else torch.randn(shape, generator=g) * 0.02
    path = tmp_path / f"{name.replace('/', '-')}-256x256.pt"
    torch.save(sd, path)
    return path


def _latents_file(path, n=1, K=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 32, 32, generator=g)
    t = {"mean": mean, "std": torch.ones_like(mean) * 0.1, "mean_flip": mean.flip(3), "std_flip": torch.ones_like(mean) * 0.1,
         "labels": torch.arange(n) % 3 + 1}
    save_file(t, str(path), metadata={"format": "repcond-latents-v1", "scaling_factor": "0.18215", "image_size": "256",
                                      "classes": json.dumps([w for w, _ in data.imagenet_classes()][:K]), "source": "test"})  # ImageNet wnids
    return path


@pytest.mark.parametrize("name", ["DiT-B/2", "DiT-XL/2"])
def test_official_dit_file_loads_and_classifies_a_latent(tmp_path, name):
    ckpt, lat = _official_file(tmp_path, name), _latents_file(tmp_path / "lat.safetensors")
    n_t = 2 if name == "DiT-B/2" else 1  # XL/2: 2 passes of 118 GFLOPs on the CPU
    m = run(["classify", "--ckpt", str(ckpt), "--data", str(lat), "--classes", "1", "2", "--n-samples", str(n_t),
             "--n-val", "0", "--device", "cpu", "--out-dir", str(tmp_path / "cls"), "--no-progress"])
    assert m["n_images"] == 1 and m["nfe_per_image"] == 2 * n_t and m["chance"] == 0.5
    rec = json.loads(open(tmp_path / "cls" / "results" / "shard-0000-of-0001.jsonl").readline())
    assert rec["pred"] in (1, 2) and rec["err"][0] is None and all(v is not None for v in rec["err"][1:3])
    den, _ = dc.load_denoiser(str(ckpt))
    assert den.kind == "dit-official" and den.num_classes == 1000 and den.net.out_channels == 8


def test_ddae_unet_trained_class_conditionally_classifies(tmp_path):
    ddae = pytest.importorskip("ddae_probe")
    unet = dict(ddae.UNet_models["tiny"], in_channels=3, image_size=32, num_classes=10)
    net = ddae.UNet(**unet)
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    cfg = dict(stage="pretrain", arch="unet", model="tiny", unet=ddae._unet_config(unet), objective="ddpm", T=1000,
               beta_range=[1e-4, 0.02], sample_shape=[3, 32, 32], num_classes=10, data="shapes", image_size=None,
               vae_path=None, classes=data.SHAPES_CLASSES)
    training.save_checkpoint(str(tmp_path / "ckpt"), net, net, None, 0, cfg)
    m = run(["classify", "--ckpt", str(tmp_path / "ckpt"), "--n-test", "4", "--n-samples", "2", "--n-val", "0",
             "--classes", "0", "1", "2", "--device", "cpu", "--out-dir", str(tmp_path / "cls"), "--no-progress"])
    assert m["n_images"] == 4 and m["nfe_per_image"] == 6
    den, _ = dc.load_denoiser(str(tmp_path / "ckpt"))
    assert den.kind == "ddae-unet" and den(torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.tensor([0, 9])).shape == (2, 3, 32, 32)


def test_unconditional_or_missing_checkpoints_give_one_clear_error(tmp_path):
    cfg = dict(stage="pretrain", model="DiT-XS/8", cond="none", sample_shape=[3, 32, 32], num_classes=0, T=1000, data="shapes")
    training.save_checkpoint(str(tmp_path / "ckpt"), models.build_model(cfg), None, None, 0, cfg)
    with pytest.raises(UserError, match="not class-conditional"):
        dc.load_denoiser(str(tmp_path / "ckpt"))
    with pytest.raises(UserError, match="no such file or folder"):
        dc.load_denoiser(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------------------------- a trained model

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DiT-XS/4 trained briefly on `shapes` at 16x16 (class-conditional, label dropout), shared by the tests below."""
    out = tmp_path_factory.mktemp("dc") / "train"
    run(["train", "--data", "shapes", "--image-size", "16", "--model", "DiT-XS/4", "--steps", "600", "--batch-size", "32", "--lr", "2e-3",
         "--ema-warmup", "--grad-clip", "1",
         "--warmup", "20", "--n-val", "60", "--log-every", "100", "--ckpt-every", "600", "--device", "cpu", "--out-dir", str(out)])
    return out / "ckpt"


def classify_args(ckpt, out, *extra):
    return ["classify", "--ckpt", str(ckpt), "--out-dir", str(out), "--device", "cpu", "--n-test", "40", "--n-samples", "8",
            "--n-val", "0", "--batch-size", "8", "--no-progress", *extra]


def test_accuracy_above_chance_on_shapes_with_auto_schedule(trained, tmp_path):
    m = run(classify_args(trained, tmp_path / "auto", "--schedule", "auto", "--n-val", "60", "--n-test", "80"))
    full = run(classify_args(trained, tmp_path / "full", "--schedule", "full", "--n-val", "60", "--n-test", "80",
                             "--calibration", str(tmp_path / "auto" / "calibration.json")))
    # chance is 10%: 20 or more right of 80 has probability 0.2% under chance
    assert full["accuracy"] >= 0.25 and full["chance"] == 0.1 and full["nfe_per_image"] == 80
    assert m["accuracy"] >= 0.25 and m["nfe_per_image"] <= 0.25 * 80 + 1e-6  # --auto-budget 0.25 is a hard cap
    assert m["calibrated"] and 0 <= m["ece"] <= 1 and m["nll"] < 2.3  # better than uniform
    assert os.path.exists(tmp_path / "full" / "confusion.png") and json.load(open(tmp_path / "full" / "metrics.json"))["img_s"] > 0
    cal = json.load(open(tmp_path / "auto" / "calibration.json"))
    assert cal["val"]["n"] == 60 and cal["auto_policy"] == m_policy(tmp_path / "auto")


def m_policy(out):
    return json.load(open(out / "run.json"))["policy"]


def _records(out):
    recs = {}
    for f in sorted(os.listdir(out / "results")):
        for line in open(out / "results" / f):
            r = json.loads(line)
            recs[r["idx"]] = r
    return recs


def _same(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert (a[i]["pred"], a[i]["nfe"], a[i]["label"]) == (b[i]["pred"], b[i]["nfe"], b[i]["label"])
        assert a[i]["err"] == pytest.approx(b[i]["err"], rel=1e-5, abs=1e-7)


def test_resume_and_shards_give_the_results_of_one_run(trained, tmp_path, monkeypatch):
    stages = ["--n-samples", "2", "8", "--to-keep", "3", "1", "--seq-alpha", "0.2"]
    one = run(classify_args(trained, tmp_path / "one", *stages))
    # two shards run separately; the first to finish only reports progress, the second merges
    assert run(classify_args(trained, tmp_path / "shards", *stages, "--shard", "1/2")) is None
    two = run(classify_args(trained, tmp_path / "shards", *stages, "--shard", "0/2"))
    # a crash in the third batch, a torn line from a crash mid-write, then a resumed run
    calls, orig = [0], dc.run_policy

    def crash(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("killed")
        return orig(*a, **k)
    monkeypatch.setattr(dc, "run_policy", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run(classify_args(trained, tmp_path / "resumed", *stages))
    monkeypatch.setattr(dc, "run_policy", orig)
    shard = tmp_path / "resumed" / "results" / "shard-0000-of-0001.jsonl"
    assert len(open(shard).readlines()) == 16
    with open(shard, "a") as f:
        f.write('{"idx": 123, "label": 3, "pr')
    resumed = run(classify_args(trained, tmp_path / "resumed", *stages))
    for m in (two, resumed):
        assert {k: m[k] for k in ("accuracy", "macro_f1", "nfe_per_image", "n_images")} == \
               {k: one[k] for k in ("accuracy", "macro_f1", "nfe_per_image", "n_images")}
    _same(_records(tmp_path / "one"), _records(tmp_path / "shards"))
    _same(_records(tmp_path / "one"), _records(tmp_path / "resumed"))
    assert one["nfe_per_image"] < 80  # the stages and the sequential test pruned
    # another schedule in the same folder is refused rather than mixed in
    with pytest.raises(UserError, match="another run"):
        run(classify_args(trained, tmp_path / "one", "--schedule", "full"))


def test_dc0_single_timestep_x0_error(trained, tmp_path):
    args = classify_args(trained, tmp_path / "dc0")
    i = args.index("--n-samples")
    m = run(args[:i] + args[i + 2:] + ["--t", "300", "--target", "x0", "--n-noise", "2"])
    assert m["nfe_per_image"] == 20 and m["t_grid"] == [300, 300] and m["target"] == "x0"
    m = run(classify_args(trained, tmp_path / "grid2", "--n-noise", "2"))  # draws per grid timestep too (the official n_trials)
    assert m["t_grid"] == [t for t in dc.timestep_grid(1000, 8) for _ in range(2)] and m["nfe_per_image"] == 10 * 16
    with pytest.raises(UserError, match="--shard"):
        run(classify_args(trained, tmp_path / "bad2", "--shard", "2/2"))


# ---------------------------------------------------------------------------------------------- official protocols

def test_noise_draws_per_timestep_on_the_stratified_grid_follow_the_official_order():
    """eval_prob_adaptive.py --n_trials: each timestep of a stage carries its n_trials draws, adjacent."""
    assert dc.timestep_grid(1000, 4, None, 2) == [125, 125, 375, 375, 625, 625, 875, 875]
    pol = dc.paper_policy(8, [2, 4], [2, 1], n_trials=2)
    assert pol.order == [2, 3, 6, 7, 0, 1, 4, 5] and pol.stages == [(4, 2), (8, 1)]
    args = dc.build_parser().parse_args(["classify", "--n-samples", "2", "4", "--to-keep", "2", "1", "--n-noise", "2"])
    assert dc.build_policy(args, 8, 10).order == pol.order


def test_shared_noise_file_rows_are_slots_in_evaluation_order(tmp_path):
    """--noise-path: row i is the i-th (timestep, trial) evaluated, as the official code indexes its noise file."""
    noise = torch.randn(10, 4, 2, 2)
    torch.save(noise, tmp_path / "noise_16.pt")
    pol = dc.paper_policy(8, [2, 4], [2, 1], n_trials=2)
    out = dc.shared_noise(str(tmp_path / "noise_16.pt"), pol, (4, 2, 2))
    assert all(torch.equal(out[j], noise[i]) for i, j in enumerate(pol.order))
    with pytest.raises(UserError, match=r"--noise-path .*noise_16.pt: expected a tensor \(N >= 8, 3, 2, 2\), got \(10, 4, 2, 2\)"):
        dc.shared_noise(str(tmp_path / "noise_16.pt"), pol, (3, 2, 2))


def test_protocol_sets_the_official_flags_and_refuses_a_conflicting_one():
    args = dc.build_parser().parse_args(["classify", "--protocol", "dit-imagenet"])
    dc.apply_protocol(args)
    assert (args.schedule, args.amp, args.n_samples, args.loss, args.n_val) == ("full", "none", [250], "l2", 0)
    assert dc.timestep_grid(1000, max(dc.stage_args(args)[0])) == list(range(2, 1000, 4))  # eval_prob_dit.py --t_interval 4
    args = dc.build_parser().parse_args(["classify", "--protocol", "sd-cifar10"])
    dc.apply_protocol(args)
    assert (args.n_samples, args.to_keep, args.loss, args.amp) == ([50, 500], [5, 1], "l1", "fp16")  # commands.md, CIFAR-10
    args = dc.build_parser().parse_args(["classify", "--protocol", "sd-cifar10", "--loss", "huber"])
    with pytest.raises(UserError, match="--protocol sd-cifar10 runs --loss l1, not huber: drop --loss"):
        dc.apply_protocol(args)


def test_official_dit_shared_noise_and_a_single_file_test_set(tmp_path):
    ckpt, lat = _official_file(tmp_path, "DiT-B/2"), _latents_file(tmp_path / "lat.safetensors", n=2)
    base = ["classify", "--ckpt", str(ckpt), "--data", str(lat), "--classes", "1", "2", "--n-samples", "2", "--device", "cpu", "--no-progress"]
    with pytest.raises(UserError, match="--n-val 200: .*lat.safetensors is one split.* pass --val-data .* or --n-val 0"):
        run([*base, "--out-dir", str(tmp_path / "refused")])  # the test images stay test images
    torch.save(torch.randn(4, 4, 32, 32), tmp_path / "noise_256.pt")
    errs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        run([*base, "--n-val", "0", "--seed", str(seed), "--noise-path", str(tmp_path / "noise_256.pt"), "--out-dir", str(out)])
        errs.append([json.loads(line)["err"] for line in open(out / "results" / "shard-0000-of-0001.jsonl")])
    assert errs[0] == errs[1]  # the noise is the file's, not the seed's


def test_dit_training_defaults_are_the_official_recipe():
    a = dc.build_parser().parse_args(["train"])
    assert (a.grad_clip, a.ema_warmup, a.ema_decay, a.lr, a.weight_decay, a.batch_size) == (0.0, False, 0.9999, 1e-4, 0.0, 256)
