"""Checkpoints and plumbing as people have them: training checkpoints with their argparse flags, state dicts of
wrapped models, full SD/SDXL files' scaling factors, class identity across data and models, FID's sample sizes, the
VAE's precision, the fp16 loss scale across a resume, and the checkpoint cadence."""
import argparse
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cli
import data
import diffusion_classifier as dc
import models
import training
import vae
from conftest import TinyFeatures
from data import UserError

SMALL_VAE = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def tiny_dit(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return models.DiT(input_size=8, in_channels=4, num_classes=num_classes, learn_sigma=True, **cli.DiT_models["DiT-XS/4"])


# ---------------------------------------------------------------------------------------------- Kind C: checkpoints

def test_a_dit_training_checkpoint_with_its_argparse_flags_loads_its_ema(tmp_path):
    dit = tiny_dit()
    ema = {k: v + 1 for k, v in dit.state_dict().items()}  # the EMA differs from the model: the loader must take it
    path = tmp_path / "0400000.pt"  # as DiT's and fast-DiT's train.py write it
    torch.save({"model": dit.state_dict(), "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-XS/4", image_size=64, global_seed=0)}, path)
    loaded = models.load_dit(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())


def test_a_namespace_is_admitted_but_code_is_still_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    path = tmp_path / "evil.pt"
    torch.save({"ema": tiny_dit().state_dict(), "args": Evil()}, path)
    with pytest.raises(UserError, match="refusing to unpickle posix.system"):
        models.load_dit(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_state_dicts_of_wrapped_models_load_strictly_everywhere(tmp_path, prefix):
    dit = tiny_dit()
    sd = {prefix + k: v for k, v in dit.state_dict().items()}
    torch.save(sd, tmp_path / "ddp.pt")
    assert all(torch.equal(models.load_dit(tmp_path / "ddp.pt").state_dict()[k], v) for k, v in dit.state_dict().items())
    # our own checkpoint folders (every method's --ckpt / --teacher / --resume goes through load_weights)
    net = models.UNet(**dict(cli.UNet_models["tiny"], image_size=16))
    os.makedirs(tmp_path / "ckpt")
    save_file({prefix + k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "ckpt" / "model.safetensors"))
    training.save_json(str(tmp_path / "ckpt" / "config.json"), {})
    other = models.UNet(**dict(cli.UNet_models["tiny"], image_size=16))
    training.load_weights(str(tmp_path / "ckpt"), other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in net.state_dict().items())
    # the VAE
    torch.manual_seed(0)
    v = vae.AutoencoderKL(**SMALL_VAE)
    save_file({prefix + k: t.contiguous() for k, t in v.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    w = vae.load(tmp_path / "vae.safetensors")
    assert all(torch.equal(w.state_dict()[k], t) for k, t in v.state_dict().items())
    # a prefix on only some keys is not a wrapper's: strict loading still names what does not fit
    mixed = dict(dit.state_dict())
    mixed["module.pos_embed"] = mixed.pop("pos_embed")
    torch.save(mixed, tmp_path / "mixed.pt")
    with pytest.raises(UserError, match="pos_embed"):
        models.load_dit(tmp_path / "mixed.pt")


def _full_checkpoint(tmp_path, name, text_prefix):
    torch.manual_seed(0)
    v = vae.AutoencoderKL(**SMALL_VAE)
    sd = {f"first_stage_model.{k}": t.contiguous() for k, t in v.state_dict().items()}
    sd[f"{text_prefix}.weight"] = torch.zeros(2)  # a stand-in for the text encoders that say which model this is
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / name))
    return str(tmp_path / name)


def test_the_scaling_factor_comes_from_what_the_file_says_and_is_recorded(tmp_path, capsys):
    sdxl = _full_checkpoint(tmp_path, "sd_xl_base_1.0.safetensors", "conditioner.embedders.0.transformer")
    sd15 = _full_checkpoint(tmp_path, "v1-5-pruned-emaonly.safetensors", "cond_stage_model.transformer")
    assert vae.load(sdxl).scaling_factor == 0.13025 and "SDXL" in vae.load(sdxl).scaling_factor_source
    assert vae.load(sd15).scaling_factor == 0.18215
    torch.manual_seed(0)
    save_file({k: t.contiguous() for k, t in vae.AutoencoderKL(**SMALL_VAE).state_dict().items()}, str(tmp_path / "bare.safetensors"))
    capsys.readouterr()
    bare = vae.load(tmp_path / "bare.safetensors")  # says nothing: the factor assumed and the flag are printed
    out = capsys.readouterr().out
    assert bare.scaling_factor == 0.18215 and "assuming 0.18215" in out and "--scaling-factor 0.13025" in out
    assert vae.load(tmp_path / "bare.safetensors", scaling_factor=0.5).scaling_factor_source == "--scaling-factor"
    # vae.py encode records the factor's provenance in the latents file
    folder = tmp_path / "imgs"
    for k in range(2):
        os.makedirs(folder / "a", exist_ok=True)
        from PIL import Image
        Image.new("RGB", (16, 16), (k * 100, 0, 0)).save(folder / "a" / f"{k}.png")
    out = tmp_path / "lat.safetensors"
    vae.main(vae.parse_args(["encode", "--data", str(folder), "--vae-path", sdxl, "--out", str(out), "--device", "cpu"]))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert float(meta["scaling_factor"]) == 0.13025 and "SDXL" in meta["scaling_factor_source"]


def test_sizes_the_vae_cannot_take_exactly_are_refused_everywhere(tmp_path):
    from PIL import Image
    os.makedirs(tmp_path / "imgs" / "a")
    Image.new("RGB", (17, 17)).save(tmp_path / "imgs" / "a" / "0.png")
    torch.manual_seed(0)
    save_file({k: t.contiguous() for k, t in vae.AutoencoderKL(**SMALL_VAE).state_dict().items()}, str(tmp_path / "v.safetensors"))
    for cmd in (["encode", "--out", str(tmp_path / "l.safetensors")], ["recon", "--out-dir", str(tmp_path / "r")]):
        with pytest.raises(UserError, match="17x17 images are not a multiple of the VAE's downsampling factor 8.*--image-size"):
            vae.main(vae.parse_args([*cmd, "--data", str(tmp_path / "imgs"), "--vae-path", str(tmp_path / "v.safetensors"), "--device", "cpu"]))
    assert not (tmp_path / "l.safetensors").exists()
    with pytest.raises(UserError, match="17x17 images are not a multiple"):  # on the fly (--vae-path in any method)
        vae.Space(data.load(str(tmp_path / "imgs")), str(tmp_path / "v.safetensors"), torch.device("cpu"))


def _latents(classes, labels, n=4):
    lat = {k: torch.zeros(n, 4, 8, 8) for k in ("mean", "std", "mean_flip", "std_flip")}
    return data.Dataset(None, torch.tensor(labels), classes, lat, 0.18215)


def test_labels_map_to_an_imagenet_models_classes_by_identity(tmp_path):
    dit = tiny_dit(num_classes=1000)
    torch.save(dit.state_dict(), tmp_path / "DiT-1000.pt")
    den, _ = dc.load_denoiser(str(tmp_path / "DiT-1000.pt"))
    assert den.classes[:2] == ["n01440764", "n01443537"] and len(den.classes) == 1000
    by_name = data.relabel(_latents(["goldfish", "tabby"], [0, 1, 1, 0]), den.classes, "--data x")
    assert by_name.labels.tolist() == [1, 281, 281, 1]  # ImageNet's goldfish and tabby, not classes 0 and 1
    by_wnid = data.relabel(_latents(["n01443537", "n02123045"], [0, 1, 1, 0]), den.classes, "--data x")
    assert by_wnid.labels.tolist() == [1, 281, 281, 1]
    with pytest.raises(UserError, match=r"--data x: classes \['my_cat'\] are not among the 1000 classes"):
        data.relabel(_latents(["goldfish", "my_cat"], [0, 1, 1, 0]), den.classes, "--data x")
    with pytest.raises(UserError, match="carry no class names"):
        data.relabel(_latents([], [0, 1, 1, 0]), den.classes, "--data x")
    # between a training split and a test file: names, not positions
    test = data.relabel(_latents(["fox", "cat"], [0, 1, 0, 1]), ["cat", "dog", "fox"], "--test-data t")
    assert test.labels.tolist() == [2, 0, 2, 0] and test.classes == ["cat", "dog", "fox"]


# ---------------------------------------------------------------------------------------------- Kind D: plumbing

def test_fid_refuses_sets_smaller_than_the_feature_dimension(tmp_path):
    real = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(UserError, match="reference set has 16 images, but its 64-dimensional feature covariance"):
        training.compute_fid(real, real, str(tmp_path), "cpu", TinyFeatures())
    with pytest.raises(UserError, match="2048-dimensional"):  # Inception: refused before any download
        training.compute_fid(real, real, str(tmp_path), "cpu")
    assert os.listdir(tmp_path) == []  # and no scratch folder is left behind


def test_the_vae_never_runs_in_fp16():
    torch.manual_seed(0)
    ds = data.Dataset(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), None, [])
    space = vae.Space(ds, None, torch.device("cpu"), amp="fp16")
    assert space.amp == "none"
    assert vae.Space(ds, None, torch.device("cpu"), amp="bf16").amp == "bf16"


class _Batches:
    def batch(self, step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        return x, x.sum(1, keepdim=True).tanh()


def _fit(out, argv, loss_scale=1.0):
    p = argparse.ArgumentParser()
    cli.add_common_args(p, "runs/test")
    cli.add_train_args(p, steps=25, batch_size=8, lr=1e-2)
    args = p.parse_args(["--device", "cpu", *argv])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return training.fit(model, lambda net, x, y, step: loss_scale * (net(x).float() - y).pow(2).mean(), _Batches(), args,
                        training.Dist(), str(out), {})


def test_checkpoints_at_the_first_log_step_past_each_interval(tmp_path, monkeypatch):
    saved = []
    real = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda d, m, e, o, step, *a, **k: (saved.append(step), real(d, m, e, o, step, *a, **k)))
    _fit(tmp_path, ["--log-every", "3", "--ckpt-every", "10", "--steps", "25"])
    assert saved == [12, 21, 25]  # was [25]: only common multiples of 3 and 10


def test_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    # a loss large enough that fp16 gradients overflow at the first loss scales: the scaler halves its scale (and
    # skips the step) several times, so a resumed run that restarted the scale at 65536 would skip other steps
    fp16 = ["--amp", "fp16", "--log-every", "2", "--ckpt-every", "4"]
    whole = _fit(tmp_path / "whole", [*fp16, "--steps", "10"], loss_scale=300.0)[0]
    _fit(tmp_path / "cut", [*fp16, "--steps", "4"], loss_scale=300.0)
    cut_scale = training.load_torch(str(tmp_path / "cut" / "ckpt" / "state.pt"))["extra"]["scaler"]["scale"]
    assert cut_scale < 65536.0  # the scale did move before the cut
    resumed = _fit(tmp_path / "cut", [*fp16, "--steps", "10", "--resume"], loss_scale=300.0)[0]
    final = [training.load_torch(str(tmp_path / d / "ckpt" / "state.pt"))["extra"]["scaler"] for d in ("whole", "cut")]
    assert final[0] == final[1]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    torch.manual_seed(0)  # the initial weights, as _fit draws them
    first = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    assert not torch.equal(first[0].weight, whole[0].weight)  # and some steps did update the weights
