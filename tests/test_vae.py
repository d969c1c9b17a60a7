"""vae.py: parity with diffusers' AutoencoderKL (SD-size and tiny configs, diffusers and LDM layouts), the
variants of the public files (prefixes, old attention names, .ckpt), clear errors, and the encode / recon CLIs.

Weights are random (seeded) and saved in the real file formats; diffusers is the reference implementation and
its `convert_ldm_vae_checkpoint` the reference LDM -> diffusers converter.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vae
from data import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get("REFERENCE_DIR", os.path.join(ROOT, "tests", "reference"))  # the public files' key lists
TOL = 1e-4  # max abs difference vs diffusers, fp32 on the CPU


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for these tiny tensors


def diffusers_vae(name, seed=0):
    """diffusers' AutoencoderKL for one of our presets, every weight random (norms too, so nothing is trivial)."""
    from diffusers import AutoencoderKL
    c = vae.VAE_configs[name]
    n = len(c["ch_mult"])
    model = AutoencoderKL(block_out_channels=[c["ch"] * m for m in c["ch_mult"]], layers_per_block=c["num_res_blocks"],
                          down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                          latent_channels=4, norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # norm scales around 1, biases small
                p.copy_(1 + 0.1 * r if "norm" in k and k.endswith("weight") else 0.05 * r)
            else:  # unit-variance outputs, so activations neither vanish nor blow up through 30 layers
                p.copy_(r / math.sqrt(p[0].numel()))
    return model


def make_ref(name, tmp):
    """A random diffusers model, its outputs on fixed inputs, and its weights in both layouts on disk."""
    d = diffusers_vae(name)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 32, 48, generator=g) * 2 - 1)  # non-square, to catch H/W mix-ups
    f = 2 ** (len(vae.VAE_configs[name]["ch_mult"]) - 1)
    z = torch.randn(2, 4, 32 // f, 48 // f, generator=g)
    with torch.no_grad():
        post = d.encode(x).latent_dist
        out = dict(mean=post.mean, logvar=post.logvar, decoded=d.decode(z).sample)
    diff_path = str(tmp / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, diff_path)
    ldm = vae.load(diff_path).state_dict()  # our own writing of the LDM keys
    ldm_path = str(tmp / "vae-ldm.safetensors")
    save_file(ldm, ldm_path)
    return dict(name=name, diffusers=d, x=x, z=z, out=out, diff_path=diff_path, ldm_path=ldm_path, ldm=ldm,
                diff_sd=d.state_dict())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_ref("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=["tiny", "small", "sd"])  # f2, f8 with repeated widths, the real size
def ref(request, tiny, tmp_path_factory):
    return tiny if request.param == "tiny" else make_ref(request.param, tmp_path_factory.mktemp(request.param))


def parity(model, ref):
    with torch.no_grad():
        post = model.encode(ref["x"])
        got = dict(mean=post.mean, logvar=post.logvar, decoded=model.decode(ref["z"]))
    diffs = {k: (got[k] - ref["out"][k]).abs().max().item() for k in got}
    print(f"\n{ref['name']} max abs diff vs diffusers: {diffs}")
    assert all(d < TOL for d in diffs.values()), diffs
    return diffs


def assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------- parity


def test_parity_diffusers_layout(ref):
    model = vae.load(ref["diff_path"])
    assert model.config == dict(vae.VAE_configs[ref["name"]], in_channels=3, z_channels=4)  # inferred from shapes
    parity(model, ref)


def test_parity_ldm_layout(ref):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ldm = load_file(ref["ldm_path"])
    assert all(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid.", "encoder.conv", "decoder.conv",
                             "encoder.norm_out", "decoder.norm_out", "quant_conv", "post_quant_conv")) for k in ldm)
    # diffusers' own converter turns our LDM file back into exactly the diffusers weights
    converted = convert_ldm_vae_checkpoint(ldm, ref["diffusers"].config)
    assert set(converted) == set(ref["diff_sd"])
    assert all(torch.equal(converted[k], v) for k, v in ref["diff_sd"].items())
    parity(vae.load(ref["ldm_path"]), ref)


def test_sd_preset_matches_reference_keys():
    """The sd preset's state dict is the LDM key list of the public files, names and shapes; our diffusers
    renaming maps the diffusers list onto it, and diffusers' converter maps it onto the diffusers list."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    with torch.device("meta"):
        model = vae.AutoencoderKL(**vae.VAE_configs["sd"])
    assert (model.downsample_factor, model.latent_channels, model.scaling_factor) == (8, 4, 0.18215)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sum(math.prod(s) for s in ours.values()) == 83_653_863
    ldm_json = os.path.join(REFERENCE, "sd_vae_ldm_keys.json")
    if not os.path.exists(ldm_json):
        pytest.skip(f"reference key lists not found in {REFERENCE} (set REFERENCE_DIR)")
    ldm_ref = json.load(open(ldm_json))
    diff_ref = json.load(open(os.path.join(REFERENCE, "sd_vae_diffusers_keys.json")))
    assert ours == ldm_ref
    meta = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert vae.infer_config(meta(ldm_ref)) == dict(vae.VAE_configs["sd"], in_channels=3, z_channels=4)
    assert {k: list(v.shape) for k, v in vae.diffusers_to_ldm(meta(diff_ref)).items()} == ldm_ref
    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    converted = convert_ldm_vae_checkpoint(meta(ldm_ref), blocks)
    assert {k: list(v.shape) for k, v in converted.items()} == diff_ref


# ----------------------------------------------------------------------------- file variants


def test_old_diffusers_attention_names(tiny, tmp_path):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in tiny["diff_sd"].items():
        for new, name in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        sd[k] = v
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    save_file(sd, tmp_path / "old.safetensors")
    model = vae.load(tmp_path / "old.safetensors")
    assert_same_weights(model, tiny["ldm"])
    parity(model, tiny)


JUNK = {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4), "loss.logvar": torch.zeros(()),
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0)}
UNET = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8)}


@pytest.mark.parametrize("prefix,layout,junk", [
    ("first_stage_model.", "ldm", {**JUNK, **UNET}),  # a full Stable Diffusion checkpoint
    ("", "ldm", JUNK),  # a VAE training checkpoint with its discriminator and EMA entries
    ("vae.", "ldm", UNET),
    ("vae.", "diffusers", UNET),
])
def test_prefixes_and_junk(tiny, tmp_path, prefix, layout, junk):
    sd = tiny["ldm"] if layout == "ldm" else tiny["diff_sd"]
    path = tmp_path / "model.safetensors"
    save_file({**{prefix + k: v.contiguous() for k, v in sd.items()}, **junk}, path)
    assert_same_weights(vae.load(path), tiny["ldm"])


def test_ckpt_with_state_dict_and_pt(tiny, tmp_path):
    ckpt = tmp_path / "sd-v1-5.ckpt"  # LDM / Lightning: {"state_dict": ..., "global_step": ...}
    torch.save({"state_dict": {**{"first_stage_model." + k: v for k, v in tiny["ldm"].items()}, **JUNK, **UNET},
                "global_step": 840000, "epoch": 3}, ckpt)
    assert_same_weights(vae.load(ckpt), tiny["ldm"])
    pt = tmp_path / "diffusion_pytorch_model.bin"  # a raw diffusers state dict saved by torch
    torch.save(tiny["diff_sd"], pt)
    assert_same_weights(vae.load(pt), tiny["ldm"])


def test_dtype_device_and_scaling_factor(tiny, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in tiny["ldm"].items()}, path)
    model = vae.load(path)  # float32 by default, whatever the file holds
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert model.scaling_factor == 0.18215 and not model.training
    model = vae.load(path, device="cpu", dtype="bfloat16", scaling_factor=0.13025)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.scaling_factor == 0.13025
    # a diffusers folder: weights plus config.json, whose scaling factor is used (SDXL's VAE says 0.13025)
    folder = tmp_path / "sdxl-vae"
    tiny["diffusers"].save_pretrained(folder)
    config = json.load(open(folder / "config.json"))
    json.dump(dict(config, scaling_factor=0.13025), open(folder / "config.json", "w"))
    model = vae.load(folder)
    assert model.scaling_factor == 0.13025
    assert_same_weights(model, tiny["ldm"])


def test_diagonal_gaussian():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.cat([torch.full((2, 2, 3, 3), 100.0), torch.full((2, 2, 3, 3), -100.0)], 1)
    post = vae.DiagonalGaussian(torch.cat([mean, logvar], 1))
    assert torch.equal(post.mean, mean) and torch.equal(post.mode(), mean)
    assert post.logvar[:, :2].eq(20).all() and post.logvar[:, 2:].eq(-30).all()  # clamped
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar)) and torch.allclose(post.var, post.std ** 2)
    s1, s2 = (post.sample(torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(s1, s2) and s1.shape == mean.shape


# ----------------------------------------------------------------------------- clear errors


def user_error(path, *expected):
    with pytest.raises(UserError) as e:
        vae.load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for s in expected:
        assert s in msg, (s, msg)
    return msg


def test_error_other_model(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({"fc.weight": torch.randn(10, 5), "fc.bias": torch.randn(10)}, path)
    user_error(path, "missing keys: encoder.conv_in.weight", "more)", "unexpected keys: fc.", "fc.weight", "fc.bias")


def test_error_missing_and_mismatched_keys(tiny, tmp_path):
    sd = dict(tiny["ldm"])
    del sd["decoder.conv_out.bias"]
    sd["encoder.mid.attn_1.q.weight"] = torch.randn(64, 64, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, path)
    msg = user_error(path, "missing keys: decoder.conv_out.bias",
                     "shape mismatches: encoder.mid.attn_1.q.weight (64, 64, 3, 3) vs model (64, 64, 1, 1)")
    assert "unexpected" not in msg


def test_error_truncated_and_corrupt_files(tiny, tmp_path):
    blob = open(tiny["ldm_path"], "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(blob[: len(blob) // 2])
    user_error(path, "safetensors")
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(os.urandom(1000))
    user_error(path)
    user_error(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "weights.h5").write_bytes(b"x")
    user_error(tmp_path / "weights.h5", "unknown checkpoint format")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_error_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1), "x": Evil(marker)}}, path)
    user_error(path, "refusing to unpickle")
    assert not marker.exists()


# ----------------------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "vae.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 6 smooth 32x32 PNGs each."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c in ("circle", "square"):
        os.makedirs(root / c)
        for i in range(6):
            img = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=32, mode="bilinear")
            Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(root / c / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("layout,dtype", [("diffusers", "float16"), ("ldm", "float32")])
def test_cli_encode(tiny, image_folder, tmp_path, layout, dtype):
    import data
    vae_path = tiny["diff_path"] if layout == "diffusers" else tiny["ldm_path"]
    out = tmp_path / "cache" / "latents.safetensors"
    extra = [] if dtype == "float16" else ["--dtype", dtype]  # float16 is the default
    r = run_cli("encode", "--data", image_folder, "--vae-path", vae_path, "--out", out, "--batch-size", 5, *extra)
    assert r.returncode == 0, r.stderr
    assert os.listdir(out.parent) == ["latents.safetensors"]  # no temporary file left behind
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    lat = load_file(out)
    ds = data.load(image_folder)
    N = len(ds)
    assert set(lat) == {"mean", "std", "mean_flip", "std_flip", "labels"}
    for k in ("mean", "std", "mean_flip", "std_flip"):
        assert lat[k].shape == (N, 4, 16, 16) and lat[k].dtype == getattr(torch, dtype), k
    assert torch.equal(lat["labels"], ds.labels) and lat["labels"].dtype == torch.int64
    assert meta["format"] == "repcond-latents-v1" and float(meta["scaling_factor"]) == 0.18215
    assert json.loads(meta["classes"]) == ds.classes == ["circle", "square"]
    assert meta["image_size"] == "32" and meta["source"] == image_folder
    # the cached posterior is the model's, for the images and for their horizontal flips
    model = vae.load(vae_path)
    idx = torch.tensor([0, 6, N - 1])
    x = ds.images[idx].float() / 127.5 - 1
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=2e-3, rtol=2e-3)
    with torch.no_grad():
        for suffix, xx in (("", x), ("_flip", x.flip(3))):
            post = model.encode(xx)
            torch.testing.assert_close(lat["mean" + suffix][idx].float(), post.mean, **tol)
            torch.testing.assert_close(lat["std" + suffix][idx].float(), post.std, **tol)
    # and data.py reads the file back
    back = data.load(str(out))
    assert back.images is None and back.scaling_factor == pytest.approx(0.18215)
    assert torch.equal(back.labels, ds.labels) and back.classes == ds.classes
    assert back.latents["mean"].shape == (N, 4, 16, 16)


def test_cli_recon(tiny, image_folder, tmp_path):
    from PIL import Image
    r = run_cli("recon", "--data", image_folder, "--vae-path", tiny["ldm_path"], "--out-dir", tmp_path, "--n-images", 6)
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout
    psnr = json.load(open(tmp_path / "metrics.json"))["psnr"]
    assert math.isfinite(psnr) and psnr > 0
    png = Image.open(tmp_path / "recon.png")
    assert png.size[0] > 0 and png.size[1] > png.size[0] / 8  # rows of originals over reconstructions


def test_cli_errors(tiny, image_folder, tmp_path):
    missing = tmp_path / "missing.safetensors"
    r = run_cli("encode", "--data", image_folder, "--vae-path", missing, "--out", tmp_path / "x.safetensors")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], r.stderr
    # the output may not be one of the inputs, nor a file data.load would not read back
    size = os.path.getsize(tiny["ldm_path"])
    for out in (tiny["ldm_path"], tmp_path / "latents.pt"):
        with pytest.raises(UserError, match="--out"):
            vae.main(vae.parse_args(["encode", "--data", image_folder, "--vae-path", tiny["ldm_path"], "--out", str(out)]))
    assert os.path.getsize(tiny["ldm_path"]) == size
