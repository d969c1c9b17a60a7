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
        model = models.DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **models.DiT_models[name])
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
    model = models.DiT(input_size=16, in_channels=3, num_classes=4, learn_sigma=False, **models.DiT_models["DiT-XS/4"])
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() == 0


def test_cfg_with_scale_one_equals_the_conditional_prediction():
    torch.manual_seed(0)
    model = models.DiT(input_size=16, in_channels=3, num_classes=4, learn_sigma=True, **models.DiT_models["DiT-XS/4"])
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
    errs = rd.dc0_errors(model, diffusion, z0, 400, 4, 2, torch.Generator().manual_seed(0))
    assert errs.argmin(1).tolist() == [2, 2, 2]
    for z_t, y in seen:
        z_t = z_t.view(-1, 4, *z_t.shape[1:])
        assert torch.equal(z_t, z_t[:, :1].expand_as(z_t))  # same x_t for all 4 classes
        assert y.tolist() == [0, 1, 2, 3] * (len(y) // 4)


# ---------------------------------------------------------------------------------------------- training

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
    budget = ["--steps", "200", "--batch-size", "32", "--lr", "1e-3", "--log-every", "50", *SMALL]
    out.rep = run(["pretrain", "--out-dir", str(out.dir / "pre"), *budget])
    out.none = run(["pretrain", "--out-dir", str(out.dir / "none"), "--cond", "none", *budget])
    run(["tune", "--ckpt", str(out.dir / "pre" / "ckpt"), "--out-dir", str(out.dir / "tune"), "--labels-per-class", "50",
         "--steps", "600", "--batch-size", "32", "--lr", "1e-3", "--log-every", "100", "--device", "cpu"])
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
    assert m["nfe_per_image"] == 10 * 2 and m["best_t_chosen_on"] == "val"
    for f in ("metrics.json", "confusion.png", "sweep.png"):
        assert (tuned.dir / "cls" / f).exists()


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


def test_sample_conditioned_on_representations(tuned):
    run(["sample", "--ckpt", str(tuned.dir / "pre" / "ckpt"), "--out-dir", str(tuned.dir / "rsamples"), "--n-images", "4",
         "--sample-steps", "5", "--device", "cpu"])
    assert (tuned.dir / "rsamples" / "samples.png").exists()


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
