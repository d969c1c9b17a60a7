"""The Stable Diffusion VAE (AutoencoderKL, kl-f8), written by hand, a latents cache for a data set, and `Space`:
where the diffusion of every method file runs (pixels, cached latents, or this VAE on the fly).

The module's attribute paths are exactly the keys of the original LDM checkpoints, so loading the public
files is a `load_state_dict(strict=True)`. `load` also reads the diffusers layout (renamed on the fly),
full Stable Diffusion checkpoints (`first_stage_model.` prefix) and infers the config from the shapes.

    import vae
    model = vae.load("vae-ft-mse-840000-ema-pruned.safetensors", device="cuda")  # or a diffusers file
    z = model.encode(x).sample() * model.scaling_factor       # x: (N, 3, H, W) in [-1, 1]
    x_hat = model.decode(z / model.scaling_factor)            # (N, 3, H, W), roughly in [-1, 1]

    python vae.py encode --data cifar10 --split train --vae-path F --out latents/cifar10_train.safetensors
    python vae.py recon --data cifar10 --split test --vae-path F --out-dir runs/recon
"""
import argparse
import json
import os
import re
import sys

from cli import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help in (("encode", "cache the posterior of every image (and its flip) in one file per split"),
                       ("recon", "original-vs-reconstruction grid PNG and PSNR")):
        s = sub.add_parser(name, help=help)
        s.add_argument("--data", required=True, help="data set name or path, as data.load")
        if name == "encode":
            s.add_argument("--split", nargs="+", default=["train"], help="train | test (several: put {split} in --out)")
        else:
            s.add_argument("--split", default="train", help="train | test")
        s.add_argument("--image-size", type=int, default=None, help="resize (center crop) images to this size")
        s.add_argument("--vae-path", required=True, help="VAE weights: .safetensors/.ckpt/.pt, LDM or diffusers layout")
        s.add_argument("--scaling-factor", type=float, default=None, help="default 0.18215 (SDXL: 0.13025)")
        s.add_argument("--batch-size", type=int, default=64 if name == "encode" else 16)
        s.add_argument("--device", default=None, help="default cuda if available, else cpu")
        s.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                       help="auto: bf16 autocast on CUDA, fp32 on the CPU (as every script; never fp16: SD VAEs overflow)")
        if name == "encode":
            s.add_argument("--out", required=True, help="latents .safetensors file to write")
            s.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage dtype")
            s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                           help="torch.compile the encoder (default: on CUDA only)")
        else:
            s.add_argument("--out-dir", required=True)
            s.add_argument("--n-images", type=int, default=16, help="number of images in the grid and the PSNR")
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help, or a line argparse refuses, answered before the imports below (torch: about 2 s)

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import UserError
from training import autocast, draw_global, load_torch, save_image_grid, save_safetensors, set_tf32, step_generator, strip_wrapper_prefixes

LATENTS_FORMAT = "repcond-latents-v1"

# -----------------------------------------------------------------------------
# model


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:  # the key exists only where channels change, as in the checkpoints
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (N, C_out, H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        # contiguous (N, 1, HW, C): with the channel dim strided, CPU SDPA falls back to its slow math path (1.8x slower)
        q, k, v = (t.reshape(N, 1, C, H * W).transpose(2, 3).contiguous() for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C), scaled by C^-0.5
        h = h.transpose(2, 3).reshape(N, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # pad right and bottom only, as the checkpoints were trained; symmetric padding would shift the
        # latent grid by half a pixel
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


def MidBlock(channels):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else ch * mult, ch * mult) for j in range(num_res_blocks)])
            # the last level does not downsample; Identity holds no weights, so it adds no keys
            level.downsample = Downsample(ch * mult) if i != len(ch_mult) - 1 else nn.Identity()
            self.down.append(level)
            c_in = ch * mult
        self.mid = MidBlock(c_in)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)  # (N, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)  # (N, ch * mult, H / 2^i, W / 2^i)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2 z, H / f, W / f)


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, out_channels, z_channels):
        super().__init__()
        n = len(ch_mult)
        c_top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_top, 3, padding=1)
        self.mid = MidBlock(c_top)
        # up[i] is the level at resolution H / 2^i, as in LDM (whose `up` is built in reverse with insert(0));
        # the forward pass walks it from the coarsest level, i = n - 1, to i = 0.
        self.up = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            c_in = ch * ch_mult[min(i + 1, n - 1)]  # channels coming from the coarser level
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(c_in if j == 0 else ch * mult, ch * mult) for j in range(num_res_blocks + 1)])
            level.upsample = Upsample(ch * mult) if i != 0 else nn.Identity()
            self.up.append(level)
        self.norm_out = Normalize(ch * ch_mult[0])
        self.conv_out = nn.Conv2d(ch * ch_mult[0], out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)  # (N, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            h = level.upsample(h)  # (N, ch * mult, ..., ...), doubled except at the last level
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 3, h * f, w * f)


class DiagonalGaussian:
    """The posterior q(z | x): a diagonal Gaussian from the encoder's (N, 2 z, h, w) moments."""

    def __init__(self, moments):
        self.parameters = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (N, z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    scaling_factor_source = "given"  # `load` says where a file's factor came from

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, z_channels=4,
                 scaling_factor=0.18215):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, in_channels=in_channels,
                           z_channels=z_channels)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.scaling_factor = scaling_factor  # latents for a diffusion model are z * scaling_factor (unit variance)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = z_channels

    def encode(self, x):
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # x: (N, 3, H, W) in [-1, 1]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))  # z: (N, 4, h, w), unscaled

    def forward(self, x):
        return self.decode(self.encode(x).mode())  # reconstruction from the posterior mean


VAE_configs = {
    "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2),  # kl-f8 of SD 1.x / 2.x / SDXL, 84M params
    "small": dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),  # f8 like sd, for fast tests
    "tiny": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1),  # f2, for the fastest tests
}
SCALING_FACTORS = {"sd": 0.18215, "sdxl": 0.13025}

# -----------------------------------------------------------------------------
# loading the public files, either layout


def _one_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _short(items, n=5):
    items = list(items)
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path):
    """A weights file -> {name: tensor} on the CPU: .safetensors, or a weights-only pickle (.ckpt .pt .pth .bin; a
    Lightning / LDM training file's "state_dict"). Raises UserError in one line: missing, unreadable, unknown suffix,
    or a pickle that would run code (training.load_torch refuses it without running it)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (expected a .safetensors, .ckpt, .pt or .bin weights file)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # truncated or corrupt: safetensors raises its own error type
            raise UserError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None
    if ext in (".ckpt", ".pt", ".pth", ".bin"):
        obj = load_torch(path, "weights file")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning / LDM training file
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}
    raise UserError(f"{path}: unknown checkpoint format '{ext}' (expected .safetensors, .ckpt, .pt, .pth or .bin)")


def _select_vae(sd):
    """The VAE's own keys: strip `first_stage_model.` (full SD checkpoint) or `vae.`; drop loss/EMA entries."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}


def is_diffusers_layout(sd):
    return any(re.search(r"(^|\.)(down_blocks|up_blocks|mid_block|conv_norm_out)\.", k) for k in sd)


def diffusers_to_ldm(sd):
    """Rename a diffusers AutoencoderKL state dict to LDM keys. Keys it does not know pass through unchanged
    (and then show up as unexpected). Linear attention weights (C, C) become 1x1 convs (C, C, 1, 1)."""
    n_up = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    attn = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
            "to_out.0": "proj_out", "proj_attn": "proj_out"}  # new names, and the ones of files before mid-2023
    out = {}
    for k, v in sd.items():
        new = k
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # diffusers counts decoder levels from the coarsest, LDM from the finest
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.", new)
        new = re.sub(r"^(decoder\.up\.\d+)\.resnets\.", r"\1.block.", new)
        new = re.sub(r"^(decoder\.up\.\d+)\.upsamplers\.0\.", r"\1.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", new)
        new = re.sub(r"\.conv_norm_out\.", ".norm_out.", new)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in attn:
            new = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if v.ndim == 2:
                v = v.reshape(*v.shape, 1, 1)
        out[new] = v
    return out


def infer_config(sd):
    """(ch, ch_mult, num_res_blocks, in_channels, z_channels) from the shapes of an LDM state dict, or None."""
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        num_res_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError, IndexError, AttributeError):
        return None
    if ch % 32 or any(w % ch or w % 32 for w in widths):  # GroupNorm(32) needs multiples of 32
        return None
    return dict(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
                in_channels=in_channels, z_channels=z_channels)


def _resolve(path):
    """A diffusers model folder (`vae/` of a pipeline) -> its weights file."""
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"{path}: folder without diffusion_pytorch_model.safetensors (expected a VAE weights file)")
    return path


def _scaling_factor_beside(path):
    """diffusers folders carry it in config.json (0.13025 for SDXL's VAE); LDM files do not carry it."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(cfg) as f:
            c = json.load(f)
        return float(c["scaling_factor"]) if c.get("_class_name") == "AutoencoderKL" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def scaling_factor_of(path, raw_keys):
    """(factor, where it came from) for a VAE file, from what the file says about itself: a diffusers config.json beside
    it, or the model a full checkpoint holds (SDXL's `conditioner.*` text encoders: 0.13025; SD 1.x / 2.x's
    `cond_stage_model.*`: 0.18215). A bare VAE file says nothing: 0.18215 is assumed, and a line says so."""
    beside = _scaling_factor_beside(path)
    if beside is not None:
        return beside, "config.json beside the weights"
    if any(k.startswith("conditioner.") for k in raw_keys):
        return SCALING_FACTORS["sdxl"], "an SDXL checkpoint (conditioner.* keys)"
    if any(k.startswith("cond_stage_model.") for k in raw_keys):
        return SCALING_FACTORS["sd"], "an SD 1.x/2.x checkpoint (cond_stage_model.* keys)"
    print(f"note: {path} does not say its latent scaling factor; assuming {SCALING_FACTORS['sd']} (SD 1.x/2.x). "
          f"SDXL's VAE needs --scaling-factor {SCALING_FACTORS['sdxl']}")
    return SCALING_FACTORS["sd"], "assumed (the file does not say; --scaling-factor overrides)"


def load(path, device=None, dtype=None, scaling_factor=None):
    """AutoencoderKL from a .safetensors / .ckpt / .pt / .bin file (or diffusers folder) in either layout.
    dtype defaults to float32 (the SD VAE can overflow in float16); scaling_factor defaults to what the file says
    (scaling_factor_of); the model's `scaling_factor_source` records where the factor came from."""
    path = _resolve(str(path))
    return from_state_dict(read_state_dict(path), path, device, dtype, scaling_factor)


def from_state_dict(raw, path, device=None, dtype=None, scaling_factor=None):
    """`load` on a state dict already read from `path` (a full Stable Diffusion file is read once, by sd.py)."""
    raw = strip_wrapper_prefixes(raw)
    sd = _select_vae(raw)
    layout = "diffusers" if is_diffusers_layout(sd) else "LDM"
    if layout == "diffusers":
        sd = diffusers_to_ldm(sd)
    config = infer_config(sd)
    if config is None:  # not even the config could be read: compare with the sd preset to list what is off
        config = dict(VAE_configs["sd"], in_channels=3, z_channels=4)
    source = "--scaling-factor"
    if scaling_factor is None:
        scaling_factor, source = scaling_factor_of(path, raw)
    with torch.device("meta"):  # no time spent on a random init that the weights overwrite
        model = AutoencoderKL(**config, scaling_factor=scaling_factor)
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(want[k])}" for k in want
                  if k in sd and sd[k].shape != want[k]]
    if missing or unexpected or mismatched:
        parts = [f"{name}: {_short(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
        raise UserError(f"{path}: does not fit the Stable Diffusion VAE ({layout} layout, config {config}): "
                        + "; ".join(parts))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.scaling_factor_source = source
    return model.to(device or "cpu").eval()


# -----------------------------------------------------------------------------
# latents cache and reconstruction


def _autocast(device, amp):
    enabled = amp in ("auto", "bf16") and device.type == "cuda"  # bf16 autocast on CPU is slower and less exact
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.inference_mode()
def encode_images(model, images, batch_size=64, amp="bf16", dtype=torch.float16, compile=False, progress=True):
    """uint8 (N, C, H, W) images -> {"mean", "std", "mean_flip", "std_flip"}: (N, z, H/f, W/f) on the CPU,
    the posterior of each image and of its horizontal flip (flip augmentation for a latent model)."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    # compiled, this loop ran 2.3x faster (H100, bf16, 256 px): eager time goes to the elementwise ops
    # between the convs (GroupNorm, SiLU, autocast's casts), which the compiler fuses
    encoder = torch.compile(model.encoder) if compile else model.encoder
    full = min(batch_size, len(images))
    out = None
    bar = tqdm(total=len(images), unit="img", desc="encode", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, non_blocking=True)
        b = len(x)
        if compile and b < full:  # pad the short last batch: one shape, no second compilation
            x = torch.cat([x, x[-1:].expand(full - b, -1, -1, -1)])
        x = torch.cat([x, x.flip(3)])  # (2B, C, H, W): images then their flips, one pass
        if x.shape[1] == 1 and model.config["in_channels"] == 3:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        with _autocast(device, amp):
            post = DiagonalGaussian(model.quant_conv(encoder(data.to_float(x))))  # model.encode, maybe compiled
        mean = post.mean.float()  # (2B, z, h, w)
        std = torch.exp(0.5 * post.logvar.float())  # from the fp32 logvar rather than a bf16 std
        if out is None:
            out = {k: torch.empty((len(images), *mean.shape[1:]), dtype=dtype) for k in ("mean", "std", "mean_flip", "std_flip")}
        half = len(x) // 2
        out["mean"][i:i + b] = mean[:b].to("cpu", dtype)  # the copy to the host is the loop's only sync
        out["std"][i:i + b] = std[:b].to("cpu", dtype)
        out["mean_flip"][i:i + b] = mean[half:half + b].to("cpu", dtype)
        out["std_flip"][i:i + b] = std[half:half + b].to("cpu", dtype)
        bar.update(b)
    bar.close()
    return out


# -----------------------------------------------------------------------------
# where the diffusion runs: pixels, cached latents, or latents encoded on the fly (every method file uses it)


POSTERIOR_STREAM = 2 * 10 ** 6  # seed offset of the VAE posterior noise (t and eps use the seed itself)


class Space:
    """Maps loader batches to the diffusion's z0 and back to images.

    Pixel space: z0 = x in [-1, 1]. A latents file (`vae.py encode`): the loader already returns
    scaled latents. An image data set with --vae-path: z0 = vae.encode(x).sample() * scaling_factor,
    computed on the fly under no_grad (bf16 on CUDA); decoding needs the VAE in both latent cases.
    The VAE never runs in fp16: SD VAEs overflow there (diffusers' force_upcast), so --amp fp16 runs it in fp32.
    """
    def __init__(self, ds, vae_path, device, amp="none", vae_model=None):
        self.vae, self.kind, self.device = None, "pixel", device
        self.amp = "none" if amp == "fp16" else amp  # the VAE's precision: fp32 or bf16, never fp16
        self.scaling_factor = ds.scaling_factor
        if ds.latents is not None:
            self.kind = "latents"
        self.vae_path = vae_path
        if vae_model is not None or vae_path not in (None, "", "none"):  # vae_model: one loaded already (sd.py's)
            self.vae = (vae_model or load(vae_path, device=device)).eval().requires_grad_(False)
            if ds.latents is None:
                self.kind, self.scaling_factor = "vae", self.vae.scaling_factor
        C, H, W = ds.sample_shape
        if self.kind == "vae":
            check_size(self.vae, (H, W), "the data")
            f = self.vae.downsample_factor
            C, H, W = self.vae.latent_channels, H // f, W // f
        self.sample_shape = (C, H, W)

    @torch.no_grad()
    def encode(self, x, generator=None, dist=None):
        """Images -> z0 (the identity unless --vae-path). generator=False: the posterior mean; with dist, the
        posterior noise is drawn for the global batch and this rank keeps its rows (N ranks == one process)."""
        if self.kind != "vae":
            return x
        with autocast(self.amp, self.device):
            post = self.vae.encode(x)
        if generator is False:
            z = post.mean.float()
            self._check_finite(z, "encoder")
        elif dist is not None:
            eps = draw_global(generator, "randn", x.shape[0], dist, *post.mean.shape[1:]).to(post.mean.dtype)
            z = (post.mean + post.std * eps).float()
        else:
            z = post.sample(generator).float()
        return z * self.scaling_factor

    def sample_z0(self, x, seed, step, dist):
        """z0 of a training batch: with --vae-path a posterior sample that is a pure function of (seed, step)
        and the global batch, so resume is exact and torchrun equals one process; else the batch itself."""
        if self.kind != "vae":
            return x
        return self.encode(x, step_generator(seed + POSTERIOR_STREAM, step, self.device), dist)

    @torch.no_grad()
    def decode(self, z):
        """z0 -> images in [-1, 1], or None when latents cannot be decoded (no --vae-path)."""
        if self.kind == "pixel":
            return z.clamp(-1, 1)
        if self.vae is None:
            return None
        with autocast(self.amp, self.device):
            x = self.vae.decode(z / self.scaling_factor).float()
        self._check_finite(x, "decoder")
        return x.clamp(-1, 1)

    def _check_finite(self, x, part):
        if not bool(torch.isfinite(x).all()):  # a host sync: evaluation paths only, never the training step
            raise UserError(f"the VAE's {part} ({self.vae_path}) gave non-finite values at precision "
                            f"{'bf16' if self.amp == 'bf16' else 'fp32'}: the VAE, not the model, overflowed")


def _device(name):
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_images(args, split, model):
    ds = data.load(args.data, split, args.image_size)
    if ds.images is None:
        raise UserError(f"--data {args.data}: holds latents already, expected images")
    if len(ds) == 0:
        raise UserError(f"--data {args.data}: no images in split '{split}'")
    if ds.images.shape[1] not in (1, model.config["in_channels"]):
        raise UserError(f"--data {args.data}: {ds.images.shape[1]}-channel images, the VAE takes "
                        f"{model.config['in_channels']}")
    check_size(model, ds.images.shape[-2:], f"--data {args.data}")
    return ds


def check_size(model, hw, what):
    """Refuse images whose sides the VAE does not divide exactly: its convolutions would silently drop the remainder
    (17 x 17 pixels -> 2 x 2 latents that decode to 16 x 16)."""
    f = model.downsample_factor
    if hw[0] % f or hw[1] % f:
        raise UserError(f"{what}: {hw[0]}x{hw[1]} images are not a multiple of the VAE's downsampling factor {f}; "
                        f"pass --image-size with a multiple of {f} (e.g. {max(f, hw[0] // f * f)})")


def _same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def cmd_encode(args):
    splits = args.split
    if len(splits) > 1 and "{split}" not in args.out:
        raise UserError(f"--out {args.out}: with several splits, put '{{split}}' in the name")
    for split in splits:
        out = args.out.replace("{split}", split)
        if not out.endswith(".safetensors"):
            raise UserError(f"--out {out}: expected a .safetensors file name")
        if _same_file(out, args.vae_path) or _same_file(out, args.data):
            raise UserError(f"--out {out}: is an input of this command; refusing to overwrite it")
    device = _device(args.device)
    if device.type == "cuda":
        set_tf32(args.amp != "none")
    # no channels_last: with GroupNorm between the convs it measured 23% slower (H100, bf16, 256 px)
    model = load(args.vae_path, device=device, scaling_factor=args.scaling_factor)
    compile = device.type == "cuda" if args.compile is None else args.compile  # compiling costs 30-90 s on CPU
    for split in splits:
        ds = _load_images(args, split, model)
        tensors = encode_images(model, ds.images, args.batch_size, args.amp, getattr(torch, args.dtype), compile)
        if ds.labels is not None:
            tensors["labels"] = ds.labels.to(torch.int64).cpu()
        meta = {"format": LATENTS_FORMAT, "scaling_factor": repr(float(model.scaling_factor)),
                "scaling_factor_source": model.scaling_factor_source,
                "classes": json.dumps(list(ds.classes)), "image_size": str(ds.images.shape[-1]),
                "source": args.data, "split": split, "vae": os.path.basename(args.vae_path)}
        out = args.out.replace("{split}", split)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_safetensors(tensors, out, meta)  # aside, then renamed: a crash never leaves a half-written latents file
        shape = tuple(tensors["mean"].shape)
        print(f"wrote {out}: {split} split of {args.data}, latents {shape} {args.dtype}, "
              f"scaling factor {model.scaling_factor}")


def _pairs(top, bottom, cols=8):
    """Originals and reconstructions (n, C, H, W) -> the grid order (a row of originals, then their reconstructions,
    ...) and a caption for each image."""
    images, captions = [], []
    for s in range(0, len(top), cols):
        pad = torch.full((cols - len(top[s:s + cols]), *top.shape[1:]), 255, dtype=top.dtype)  # a short last row
        images += [top[s:s + cols], pad, bottom[s:s + cols], pad]
        captions += [f"original {i}" for i in range(s, min(s + cols, len(top)))] + [""] * len(pad)
        captions += [f"recon {i}" for i in range(s, min(s + cols, len(top)))] + [""] * len(pad)
    return torch.cat(images), captions


@torch.inference_mode()
def cmd_recon(args):
    device = _device(args.device)
    model = load(args.vae_path, device=device, scaling_factor=args.scaling_factor)
    ds = _load_images(args, args.split, model)
    idx = torch.linspace(0, len(ds) - 1, min(args.n_images, len(ds))).round().long().unique()  # spread over the set
    x = ds.images[idx]
    rec = []
    for i in range(0, len(x), args.batch_size):
        xb = x[i:i + args.batch_size].to(device)
        if xb.shape[1] == 1:
            xb = xb.expand(-1, 3, -1, -1)
        with _autocast(device, args.amp):
            r = model(data.to_float(xb))  # (B, 3, H, W)
        rec.append(data.to_uint8(r).cpu())
    rec = torch.cat(rec)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mse = (rec.float() - x.float()).pow(2).mean((1, 2, 3)).clamp_min(1e-10)  # per image, over [0, 255]
    psnr = (10 * torch.log10(255.0 ** 2 / mse)).mean().item()
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "recon.png")
    grid, captions = _pairs(x, rec, cols=min(8, len(x)))
    save_image_grid(grid, png, nrow=min(8, len(x)), captions=captions)
    with open(os.path.join(args.out_dir, "config.json"), "w") as fh:
        json.dump(vars(args), fh, indent=2, default=str)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as fh:
        json.dump({"psnr": psnr, "n": len(x)}, fh, indent=2)
    print(f"PSNR {psnr:.2f} dB over {len(x)} images ({args.data}, {args.split}); wrote {png}")


def main(args):
    {"encode": cmd_encode, "recon": cmd_recon}[args.command](args)


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
