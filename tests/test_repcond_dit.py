"""repcond_dit.py: official DiT compatibility, the losses, resume, torchrun, tune + Diffusion Classifier Zero."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import repcond_dit as rd
from cli import DiT_models
from data import UserError
import models
import training
from conftest import TinyFeatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(ROOT, "tests", "reference", "dit_official_keys.json")  # the official release's key names and shapes
TINY = ["--model", "DiT-XS/8", "--encoder", "ViT-XS/8", "--rep-dim", "32", "--device", "cpu"]  # plumbing tests
SMALL = ["--model", "DiT-XS/4", "--encoder", "ViT-XS/4", "--rep-dim", "32", "--device", "cpu", "--image-size", "16"]  # tests that learn


def run(argv):
    return rd.main(rd.build_parser().parse_args(argv))


def cli(argv, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "repcond_dit.py"), *argv], capture_output=True, text=True, cwd=ROOT, **kw)


# ---------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", ["DiT-XL/2", "DiT-B/2"])
def test_dit_names_and_shapes_equal_official_release(name):
    ref = json.load(open(REF))[name]
    with torch.device("meta"):
        model = models.DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DiT_models[name])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref


def _random_official_file(tmp_path, name, wrap=None):
    """Random fp16 weights with the release's names and shapes. To keep the 675M-parameter XL/2 cheap, every
    block shares block 0's random tensors (torch.save stores a shared storage once)."""
    ref = json.load(open(REF))[name]
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in ref.items():
        parts = k.split(".")
        shared = ".".join(["blocks", "0", *parts[2:]]) if parts[0] == "blocks" else k
        sd[k] = sd[shared] if shared in sd else (torch.randn(shape, generator=g) * 0.02).half()
    obj = {wrap: sd, "args": {"model": name}} if wrap else sd
    path = tmp_path / f"{name.replace('/', '-')}.pt"
    torch.save(obj, path)
    return path, sd


def test_official_dit_b2_file_loads_strictly_and_predicts_eps(tmp_path):
    path, sd = _random_official_file(tmp_path, "DiT-B/2", wrap="ema")
    model = models.load_dit(path)
    assert model.num_classes == 1000 and model.out_channels == 8 and model.depth == 12
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc1.weight"], sd["blocks.3.mlp.fc1.weight"].float())
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32), torch.tensor([10, 500]), y=torch.tensor([3, 1000]))
    assert out.shape == (2, 8, 32, 32) and torch.isfinite(out).all()


def test_official_dit_xl2_file_loads_strictly(tmp_path):
    path, sd = _random_official_file(tmp_path, "DiT-XL/2")
    model = models.load_dit(path)
    assert model.depth == 28 and model.hidden_size == 1152 and model.num_classes == 1000
    assert torch.equal(model.pos_embed, sd["pos_embed"].float())


def test_checkpoint_of_another_model_gives_one_clear_error(tmp_path):
    path, sd = _random_official_file(tmp_path, "DiT-B/2")
    sd = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "blocks.11.attn.qkv.weight"}
    sd["extra.weight"] = torch.zeros(3)
    sd["final_layer.linear.bias"] = torch.zeros(16)
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"missing \[blocks\.11\.attn\.qkv\.weight\].*unexpected \[extra\.weight\].*final_layer\.linear\.bias \(16,\) vs \(32,\)"):
        models.load_dit(path)


def test_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"pos_embed": Evil()}, path)
    with pytest.raises(UserError, match="evil.pt"):
        models.load_dit(path)
    assert not (tmp_path / "pwned").exists()


def test_sincos_positions_follow_the_mae_layout():
    # first half of the channels encodes the column, second half the row; sin then cos within each half
    pe = models.sincos_pos_embed_2d(8, 4)[0]  # (16, 8)
    col, row = 1, 2
    assert torch.allclose(pe[row * 4 + col, :2], torch.tensor([0.8414709848, 0.0099998333]), atol=1e-6)  # sin(col * omega)
    assert torch.allclose(pe[row * 4 + col, 4:6], torch.tensor([0.9092974268, 0.0199986667]), atol=1e-6)  # sin(row * omega)


def test_adaln_zero_makes_a_fresh_dit_predict_zero():
    model = models.DiT(input_size=16, in_channels=3, num_classes=4, learn_sigma=False, **DiT_models["DiT-XS/4"])
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() == 0


def test_cfg_with_scale_one_equals_the_conditional_prediction():
    torch.manual_seed(0)
    model = models.DiT(input_size=16, in_channels=3, num_classes=4, learn_sigma=True, **DiT_models["DiT-XS/4"])
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0)[:, :3], model(x, t, y=y)[:, :3], atol=1e-5)


def test_dc0_shares_eps_across_classes_and_picks_the_best_reconstruction():
    """A stub denoiser whose eps prediction is exact only for class 2: DC0 must pick class 2, and every
    class must have seen the same noisy input for a given image."""
    diffusion = models.Diffusion()
    seen = []

    class Stub(torch.nn.Module):
        num_classes = 4

        def forward(self, z_t, t, y=None):
            seen.append((z_t.clone(), y.clone()))
            eps_true = (z_t - diffusion.gamma[t].view(-1, 1, 1, 1) * z0_rep[:len(z_t)]) / diffusion.delta[t].view(-1, 1, 1, 1)
            return torch.where((y == 2).view(-1, 1, 1, 1), eps_true, eps_true + 0.3)

    model = torch.nn.Module()
    model.denoiser = Stub()
    z0 = torch.randn(3, 3, 8, 8)
    z0_rep = z0.repeat_interleave(4, 0)
    errs = rd.dc0_errors(model, diffusion, z0, 400, 4, torch.randn(2, *z0.shape, generator=torch.Generator().manual_seed(0)))
    assert errs.argmin(1).tolist() == [2, 2, 2]
    for z_t, y in seen:
        z_t = z_t.view(-1, 4, *z_t.shape[1:])
        assert torch.equal(z_t, z_t[:, :1].expand_as(z_t))  # same x_t for all 4 classes
        assert y.tolist() == [0, 1, 2, 3] * (len(y) // 4)


def test_cfg_can_guide_the_first_three_channels_as_the_official_dit():
    """The official DiT's forward_with_cfg: eps[:, :3] guided, eps[:, 3] and the variance channels conditional."""
    torch.manual_seed(0)
    model = models.DiT(input_size=16, in_channels=4, num_classes=4, learn_sigma=True, **DiT_models["DiT-XS/4"])
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y, s = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.tensor([0, 3]), 4.0
    with torch.no_grad():
        cond, uncond = model(x, t, y=y), model(x, t, y=torch.full_like(y, 4))
        official = torch.cat([uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        ours_all = torch.cat([uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
        assert torch.allclose(model.forward_with_cfg(x, t, y, s, guided_channels=3), official, atol=1e-5)
        assert torch.allclose(model.forward_with_cfg(x, t, y, s), ours_all, atol=1e-5)
        assert not torch.allclose(official, ours_all, atol=1e-3)


def test_T_below_1000_rescales_the_betas_as_dit():
    """DiT's get_named_beta_schedule("linear", T): betas linspace(1e-4, 0.02) * 1000 / T, so sampling from pure noise
    stays right at small T (unscaled, T = 100 would end with a signal fraction sqrt(abar) of 0.60)."""
    import numpy as np
    for T in (100, 250, 1000):
        ref = np.cumprod(1 - np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
        assert np.allclose(models.Diffusion(T).alphas_cumprod.double().numpy(), ref, rtol=1e-5)
    assert abs(models.Diffusion(100).alphas_cumprod[-1].item() - 2.039e-5) < 1e-8
    assert models.Diffusion(100, scale_to_T=False).alphas_cumprod[-1].sqrt().item() > 0.6  # DDAE's convention: as given


def test_binary_f1_is_the_positive_class_f1():
    cm = torch.tensor([[50, 10], [5, 35]])  # rows: true; class 1: tp 35, fn 5, fp 10
    assert training.binary_f1(cm, 1) == 2 * 35 / (2 * 35 + 5 + 10)
    assert training.binary_f1(cm, 0) == 2 * 50 / (2 * 50 + 10 + 5)
    assert abs(training.accuracy_f1(torch.tensor([0] * 50 + [1] * 10 + [0] * 5 + [1] * 35), torch.tensor([0] * 60 + [1] * 40), 2)[1]
               - (training.binary_f1(cm, 0) + training.binary_f1(cm, 1)) / 2) < 1e-6


def test_amp_none_turns_tf32_off():
    training.setup_distributed("cpu", "auto")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    training.setup_distributed("cpu", "none")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


# ---------------------------------------------------------------------------------------------- training

def test_dit_training_defaults_are_the_official_recipe(tmp_path):
    """No gradient clipping and EMA 0.9999 from step 0 (DiT's train.py); the warm-up and clipping are flags."""
    for stage in ("pretrain", "tune"):
        a = rd.build_parser().parse_args([stage, "--ckpt", "x"] if stage == "tune" else [stage])
        assert (a.grad_clip, a.ema_warmup, a.ema_decay, a.lr, a.weight_decay, a.batch_size) == (0.0, False, 0.9999, 1e-4, 0.0, 256)
    run(["pretrain", "--out-dir", str(tmp_path), "--steps", "1", "--batch-size", "4", "--lr", "1e-2", *TINY])
    torch.manual_seed(0)  # pretrain's seed before it builds the model: the initial weights
    init = rd.build_model(json.load(open(tmp_path / "ckpt" / "config.json"))).state_dict()
    model, ema = load_file(tmp_path / "ckpt" / "model.safetensors"), load_file(tmp_path / "ckpt" / "ema.safetensors")
    k = "denoiser.final_layer.linear.weight"  # zero at init (adaLN-Zero), moved by the first step
    assert torch.allclose(ema[k], init[k].lerp(model[k], 1e-4), atol=1e-7) and not torch.equal(model[k], init[k])


def test_resume_is_exact(tmp_path):
    common = ["--steps", "12", "--batch-size", "16", "--log-every", "3", "--ckpt-every", "6", *TINY]
    run(["pretrain", "--out-dir", str(tmp_path / "full"), *common])
    run(["pretrain", "--out-dir", str(tmp_path / "half"), *[a if a != "12" else "6" for a in common]])
    run(["pretrain", "--out-dir", str(tmp_path / "half"), "--resume", *common])
    a = load_file(tmp_path / "full" / "ckpt" / "model.safetensors")
    b = load_file(tmp_path / "half" / "ckpt" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = load_file(tmp_path / "full" / "ckpt" / "ema.safetensors"), load_file(tmp_path / "half" / "ckpt" / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoint_swap_leaves_a_readable_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    d = str(tmp_path / "ckpt")
    training.save_checkpoint(d, model, step=1, config={"a": 1})
    os.replace(d, d + ".old")  # a crash between the two renames of the next save
    assert training.find_checkpoint(d) == d + ".old"
    training.save_checkpoint(d, model, step=2, config={"a": 2})
    assert training.find_checkpoint(d) == d and not os.path.exists(d + ".old")


# ---------------------------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Pre-train with and without representation conditioning at the same budget, then tune the first
    (shapes at 16x16, as the bare run: a step costs a third of one at 32x32, so the tune can be longer)."""
    out = types.SimpleNamespace(dir=tmp_path_factory.mktemp("pipe"))
    budget = ["--steps", "200", "--batch-size", "32", "--lr", "1e-3", "--log-every", "50", "--ema-warmup", "--grad-clip", "1", *SMALL]
    out.rep = run(["pretrain", "--out-dir", str(out.dir / "pre"), *budget])
    out.none = run(["pretrain", "--out-dir", str(out.dir / "none"), "--cond", "none", *budget])
    run(["tune", "--ckpt", str(out.dir / "pre" / "ckpt"), "--out-dir", str(out.dir / "tune"), "--labels-per-class", "50",
         "--steps", "600", "--batch-size", "32", "--lr", "1e-3", "--log-every", "100", "--ema-warmup", "--grad-clip", "1", "--device", "cpu"])
    return out


def test_representation_conditioning_lowers_the_loss_at_equal_budget(tuned):
    # same seed, so both runs see the same batches, timesteps and noise: a paired comparison
    assert tuned.rep["eval_loss"] < tuned.none["eval_loss"]
    log = [json.loads(line) for line in open(tuned.dir / "pre" / "log.jsonl")]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]  # the loss falls
    cfg = json.load(open(tuned.dir / "pre" / "ckpt" / "config.json"))
    assert cfg["cond"] == "rep" and cfg["sample_shape"] == [3, 16, 16]
    keys = load_file(tuned.dir / "pre" / "ckpt" / "model.safetensors").keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)


def test_tune_starts_exactly_where_pretraining_left_off(tuned, tmp_path):
    """Before any update (lr 0), the tuned DiT with label k predicts what the pre-trained denoiser predicts given the
    class-k mean representation in its blocks and the labeled set's mean decode map at its input (--map-init mean)."""
    run(["tune", "--ckpt", str(tuned.dir / "pre" / "ckpt"), "--out-dir", str(tmp_path), "--labels-per-class", "5", "--steps", "1",
         "--lr", "0", "--batch-size", "8", "--device", "cpu"])
    pre, pcfg, ds, space = models.load_run(str(tuned.dir / "pre" / "ckpt"), "cpu", kinds=("dit",))
    tuned_model, cfg, _, _ = models.load_run(str(tmp_path / "ckpt"), "cpu", kinds=("dit",))
    lab = ds.subset(torch.tensor(cfg["labeled_indices"]))
    with torch.no_grad():
        tokens, r = pre.encoder(space.encode(lab.images.float() / 127.5 - 1, generator=False))
        mean_map = pre.encoder.decode(tokens).mean(0, keepdim=True)
        z_t, t = torch.randn(3, *space.sample_shape), torch.tensor([10, 200, 700])
        for k in (0, 4):
            r_k = r[lab.labels == k].mean(0, keepdim=True).expand(3, -1)
            want = pre.denoiser(z_t, t, r=r_k, x_map=mean_map.expand(3, -1, -1, -1))
            got = tuned_model.denoiser(z_t, t, y=torch.full((3,), k))
            assert torch.allclose(got, want, atol=1e-5)
            assert not torch.allclose(got, pre.denoiser(z_t, t, r=r_k), atol=1e-3)  # the map matters: dropping it is not exact


def test_tuned_model_is_an_official_format_class_conditional_dit(tuned):
    sd = load_file(tuned.dir / "tune" / "ckpt" / "ema.safetensors")
    assert sd["denoiser.y_embedder.embedding_table.weight"].shape[0] == 11  # 10 classes + the null label
    assert not any(k.startswith(("encoder.", "denoiser.rep_embedder")) for k in sd)


def test_classify_beats_chance_and_writes_its_outputs(tuned):
    m = run(["classify", "--ckpt", str(tuned.dir / "tune" / "ckpt"), "--out-dir", str(tuned.dir / "cls"), "--t", "50", "100",
             "--n-test", "300", "--n-val", "100", "--device", "cpu"])
    # a 200 + 600 step CPU model (0.26 measured); 0.18 on 300 images is 4.6 binomial standard deviations above chance
    assert m["accuracy"] > 1.8 * m["chance"]
    assert set(m["accuracy_per_t"]) == {"50", "100"} and m["best_t"] in (50, 100)
    assert m["n_noise"] == 8 and m["nfe_per_image"] == 10 * 8 * 2 and m["best_t_chosen_on"] == "val"  # 8 draws by default
    for f in ("metrics.json", "confusion.png", "sweep.png"):
        assert (tuned.dir / "cls" / f).exists()
    # t is chosen on train images that tune never saw; both sets are recorded
    tuned_on = json.load(open(tuned.dir / "tune" / "ckpt" / "config.json"))["labeled_indices"]
    assert len(tuned_on) == 10 * 50 and len(m["val_indices"]) == 100 and m["val_excludes_tune_set"]
    assert not set(tuned_on) & set(m["val_indices"]) and "f1" not in m  # ten classes: macro-F1 only


def test_dc0_noise_is_a_function_of_the_image_not_the_batch(tuned):
    """Image i's noise comes from (seed, i, draw, t): other batch sizes (and rank splits) give the same errors."""
    model, cfg, ds, space = models.load_run(str(tuned.dir / "tune" / "ckpt"), "cpu", kinds=("dit",))
    sub, index = ds.subset(torch.arange(20, 30)), torch.arange(20, 30)
    dist, diffusion = training.Dist(), models.Diffusion(cfg["T"])
    a = rd.dc0_sweep(model, space, sub, index, diffusion, [50, 300], 2, 0, dist, batch_size=3, max_batch=64)
    b = rd.dc0_sweep(model, space, sub, index, diffusion, [50, 300], 2, 0, dist, batch_size=10, max_batch=2048)
    c = rd.dc0_sweep(model, space, sub.subset(torch.arange(5, 10)), index[5:], diffusion, [50, 300], 2, 0, dist, 4, 64)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[:, 5:], c, atol=1e-5)


def test_probe_on_r_beats_chance(tuned):
    m = run(["probe", "--ckpt", str(tuned.dir / "pre" / "ckpt"), "--out-dir", str(tuned.dir / "probe"), "--labels-per-class", "50", "--device", "cpu"])
    assert m["probe_accuracy"] > 2 * m["chance"]


def test_fid_is_near_zero_for_the_same_set_and_larger_for_noise(tmp_path):
    import data
    real = data.load("shapes", "test").images[:200]
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8)
    same = training.compute_fid(real, real, str(tmp_path), "cpu", TinyFeatures())
    far = training.compute_fid(real, noise, str(tmp_path), "cpu", TinyFeatures())
    assert abs(same) < 1e-3 and far > 100 * max(same, 1e-3)


def test_sample_with_labels_and_cfg_writes_a_grid(tuned):
    m = run(["sample", "--ckpt", str(tuned.dir / "tune" / "ckpt"), "--out-dir", str(tuned.dir / "samples"), "--n-images", "8",
             "--sample-steps", "5", "--cfg-scale", "2", "--sampler", "ddpm", "--device", "cpu"])
    assert (tuned.dir / "samples" / "samples.png").exists() and m["n"] == 8


def test_sample_fid_names_what_it_measures(tuned, monkeypatch):
    """Against the train split by default; a representation-conditioned model's score is a reconstruction FID."""
    monkeypatch.setattr(training, "inception", lambda path, device: TinyFeatures())  # 64 features, no download
    monkeypatch.setattr(training, "INCEPTION_DIM", 64)
    fid = ["--fid", "--n-fid", "80", "--batch-size", "40", "--sample-steps", "5", "--device", "cpu"]
    m = run(["sample", "--ckpt", str(tuned.dir / "pre" / "ckpt"), "--out-dir", str(tuned.dir / "rsamples"), *fid])
    assert (tuned.dir / "rsamples" / "samples.png").exists() and "fid" not in m and m["fid_recon"] >= 0
    assert m["fid_reference"] == "train split" and m["fid_n_reference"] == m["fid_n_generated"] == 80
    assert m["fid_conditioning"] == "r and decode map of the 80 reference images"
    m = run(["sample", "--ckpt", str(tuned.dir / "tune" / "ckpt"), "--out-dir", str(tuned.dir / "fsamples"), "--fid-ref", "test", *fid])
    assert m["fid"] >= 0 and m["fid_reference"] == "test split" and "fid_recon" not in m


# ---------------------------------------------------------------------------------------------- bad input

def test_classify_on_a_pretrain_checkpoint_is_a_clear_error(tuned):
    r = cli(["classify", "--ckpt", str(tuned.dir / "pre" / "ckpt"), "--device", "cpu"])
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "run `tune` first" in r.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = cli(["tune", "--ckpt", str(tmp_path / "nope"), "--device", "cpu"])
    assert r.returncode != 0 and r.stderr.startswith("error:") and "nope" in r.stderr and "Traceback" not in r.stderr


def test_incompatible_flags_are_a_clear_error(tmp_path):
    r = cli(["pretrain", "--cond", "none", "--freeze-encoder", "--out-dir", str(tmp_path), *TINY])
    assert r.returncode != 0 and "--freeze-encoder needs --cond rep" in r.stderr and "Traceback" not in r.stderr


def test_sample_from_an_official_dit_file_guides_three_channels(tmp_path):
    """An official DiT release file samples with the release's guidance (first 3 latent channels) and its classes."""
    from test_diffusion_classifier import _latents_file, _official_file
    ckpt, lat = _official_file(tmp_path, "DiT-B/2"), _latents_file(tmp_path / "lat.safetensors", n=2)
    m = run(["sample", "--ckpt", str(ckpt), "--data", str(lat), "--out-dir", str(tmp_path / "s"), "--n-images", "2",
             "--sample-steps", "2", "--cfg-scale", "4", "--device", "cpu"])
    assert m["cfg_channels"] == 3 and load_file(tmp_path / "s" / "samples.safetensors")["samples"].shape == (2, 4, 32, 32)
    r = cli(["sample", "--ckpt", str(ckpt), "--out-dir", str(tmp_path / "t"), "--device", "cpu"])
    assert r.returncode != 0 and "an official DiT file needs --data" in r.stderr and "Traceback" not in r.stderr
