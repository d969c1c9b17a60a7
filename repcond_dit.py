"""
Representation-conditioned latent DiT, label tuning and Diffusion Classifier Zero.

Paper: "Image Classification Using a Diffusion Model as a Pre-Training Model" (arXiv 2505.06890,
shared/papers/000_*). A ViT encoder f_phi reads the clean latent z0 and its representation
r = f_phi(z0) conditions a DiT denoiser g_theta; both are trained jointly on unlabeled data with

    L(theta, phi) = || eps - g_theta(z_t, r, t) ||^2,    z_t = gamma_t z0 + delta_t eps.

Then `tune` swaps representation conditioning for class-label conditioning and fine-tunes on a few
labels, and `classify` (Diffusion Classifier Zero) predicts argmin_c || z0 - z0'(c) ||^2 where
z0'(c) = (z_t - delta_t eps_hat(z_t, c, t)) / gamma_t, with the same eps for every class.

    python repcond_dit.py --out-dir runs/demo                 # whole pipeline on `shapes`, CPU, minutes
    torchrun --nproc_per_node=8 repcond_dit.py pretrain --data latents.safetensors --model DiT-B/2
    python repcond_dit.py tune --ckpt runs/x/pretrain --labels-per-class 10 ...
    python repcond_dit.py classify --ckpt runs/x/tune --t 100 200 300 400 500 600 700 800 900
    python repcond_dit.py sample --ckpt runs/x/tune --cfg-scale 4 --fid

The DiT is the official release's architecture with its parameter names, so `DiT-XL-2-256x256.pt`
loads strictly (`load_dit`). The run utilities below (distributed set-up, `fit`, checkpoints, logs,
pictures, probes, FID) are shared by the other method scripts, which import them from here.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
from data import UserError

# ----------------------------------------------------------------------------------------------
# Model: DiT (official parameter names) and the ViT encoder f_phi


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, cat([cos, sin]) as in DiT/ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos positions of MAE/DiT: half the channels encode one axis, half the other."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # DiT meshgrids (w, h), so the first half of the channels follows the column index
    emb = np.concatenate([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)  # (1, grid_size**2, dim)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embeddings with one extra row (index num_classes) for the null label of classifier-free guidance."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y, drop_mask=None):
        if drop_mask is not None:  # (N,) bool, drawn by the caller so that it is reproducible
            y = torch.where(drop_mask, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D / heads)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning c sets shift/scale/gate of both sub-layers."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, p, channels):
    """(N, T, p*p*C) tokens -> (N, C, H, W) image, T = (H/p)*(W/p) on a square grid."""
    N, T, _ = x.shape
    h = w = int(T ** 0.5)
    x = x.reshape(N, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, channels, h * p, w * p)


class DiT(nn.Module):
    """Diffusion Transformer. Conditioning c = t_emb [+ y_emb] [+ rep_embedder(r)] drives every block's adaLN.

    With rep_dim > 0 a representation r (N, rep_dim) is added to c: this is how r is "combined at the
    beginning of each of the N blocks" in the paper (which does not name the operator; adaLN
    conditioning is DiT's own way in, and it lets `tune` swap r for a label embedding exactly).
    With input_map=True a latent-shaped map (the encoder's "decode" output) gets its own patch embedding,
    added to the input tokens: the same as concatenating it to x as extra channels, so the denoiser can
    tell the map and the noisy input apart (adding the map to x in pixel space would mix the two).
    """
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, rep_dim=0, input_map=False):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.rep_dim, self.hidden_size, self.depth = num_classes, rep_dim, hidden_size, depth
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if rep_dim > 0:
            self.rep_embedder = nn.Linear(rep_dim, hidden_size)
        if input_map:
            self.map_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        num_patches = (input_size // patch_size) ** 2
        # stored in the state dict like the official release, but never trained
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears, sin-cos positions, and adaLN-Zero (every block starts as identity)."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, self.input_size // self.patch_size))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if hasattr(self, "map_embedder"):
            nn.init.xavier_uniform_(self.map_embedder.proj.weight.data.view(self.hidden_size, -1))
            nn.init.zeros_(self.map_embedder.proj.bias)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.rep_dim > 0:
            nn.init.zeros_(self.rep_embedder.weight)  # starts as the unconditional model
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None, r=None, y_drop=None, x_map=None):
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels, r: (N, rep_dim),
        x_map: (N, C, H, W) encoder map. -> (N, out_C, H, W)"""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        if x_map is not None:
            x = x + self.map_embedder(x_map)  # injection point 1
        c = self.t_embedder(t)  # (N, D)
        if y is not None:
            c = c + self.y_embedder(y, y_drop)
        if r is not None:
            c = c + self.rep_embedder(r)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*out_C)
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance on eps: x and t are the un-doubled batch, y its labels."""
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        eps_c, eps_u = out[:, :self.in_channels].chunk(2)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        return torch.cat([eps, out[:len(x), self.in_channels:]], dim=1)


class ViTBlock(nn.Module):
    """Pre-norm transformer block of the encoder (no conditioning)."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """f_phi: clean latent z0 -> (tokens, pooled representation r), plus the paper's "decode" head.

    The decode head (Norm, Linear, Unpatchify) turns the tokens into a latent-shaped map that is combined
    with the denoiser's input (injection point 1). It starts as a random (xavier) projection rather than at
    zero: a zero head behind DiT's zero-initialised blocks gets no gradient until the blocks wake up, and
    the joint model then takes hundreds of steps longer to use the map.
    """
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                 rep_dim=256, decode_head=True):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(hidden_size, input_size // patch_size), requires_grad=False)
        self.blocks = nn.ModuleList([ViTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.rep_head = nn.Linear(hidden_size, rep_dim)
        if decode_head:
            self.decode_norm = nn.LayerNorm(hidden_size, eps=1e-6)
            self.decode_linear = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.decode_head = decode_head
        self.apply(lambda m: (nn.init.xavier_uniform_(m.weight), nn.init.zeros_(m.bias)) if isinstance(m, nn.Linear) else None)

    def forward(self, z0):
        """z0: (N, C, H, W) -> tokens (N, T, D), r (N, rep_dim)"""
        x = self.x_embedder(z0) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        tokens = self.norm(x)  # (N, T, D)
        return tokens, self.rep_head(tokens.mean(dim=1))  # r: (N, rep_dim)

    def decode(self, tokens):
        return unpatchify(self.decode_linear(self.decode_norm(tokens)), self.patch_size, self.in_channels)  # (N, C, H, W)


class RepCondDiT(nn.Module):
    """The pre-training model: encoder f_phi (optional) + denoiser g_theta, one module for DDP and checkpoints.

    inject: "both" (the paper: decode map added to the input and r in every block's conditioning),
    "blocks" (the bottleneck variant: pooled r only; the denoiser never sees z0 spatially), "input".
    cond "none" drops the encoder: the unconditional baseline.
    """
    def __init__(self, denoiser, encoder=None, inject="both"):
        super().__init__()
        self.denoiser, self.encoder, self.inject = denoiser, encoder, inject

    def forward(self, z_t, t, z0=None, y=None, y_drop=None):
        r = x_map = None
        if self.encoder is not None:
            tokens, r = self.encoder(z0)  # (N, T, D), (N, rep_dim)
            if self.inject in ("both", "input"):
                x_map = self.encoder.decode(tokens)  # (N, C, H, W)
            if self.inject == "input":
                r = None
        return self.denoiser(z_t, t, y=y, r=r, y_drop=y_drop, x_map=x_map)


# presets: (depth, hidden, heads); DiT-XS and ViT-XS are this project's CPU sizes for demos and tests
_DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4)}
DiT_models = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for s, (d, h, n) in _DIT_SIZES.items() for p in (2, 4, 8)}
_VIT_SIZES = {"B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4)}
ViT_models = {f"ViT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for s, (d, h, n) in _VIT_SIZES.items() for p in (2, 4, 8)}


def build_model(cfg):
    """Build the model described by a config dict (what config.json of a checkpoint holds)."""
    C, H = cfg["sample_shape"][0], cfg["sample_shape"][1]
    rep = cfg.get("cond") == "rep"
    rep_dim = cfg["rep_dim"] if rep and cfg.get("inject") != "input" else 0
    denoiser = DiT(input_size=H, in_channels=C, num_classes=cfg.get("num_classes", 0), learn_sigma=cfg.get("learn_sigma", False),
                   class_dropout_prob=cfg.get("class_dropout", 0.1), rep_dim=rep_dim,
                   input_map=rep and cfg.get("inject") in ("both", "input"), **DiT_models[cfg["model"]])
    encoder = None
    if rep:
        encoder = ViTEncoder(input_size=H, in_channels=C, rep_dim=cfg["rep_dim"], decode_head=cfg["inject"] in ("both", "input"),
                             **ViT_models[cfg["encoder"]])
    return RepCondDiT(denoiser, encoder, cfg.get("inject", "both"))


def load_dit(path, device="cpu"):
    """Load an official DiT checkpoint (raw state dict, or a training checkpoint's "ema"/"model") strictly.

    The architecture is read off the tensor shapes: hidden size and token count from pos_embed, patch and
    channels from x_embedder, depth from the blocks, classes from the label table (minus the null row).
    """
    sd = load_torch(path, "DiT checkpoint")
    if isinstance(sd, dict) and ("ema" in sd or "model" in sd):
        sd = sd.get("ema", sd.get("model"))
    if not isinstance(sd, dict) or "pos_embed" not in sd or "x_embedder.proj.weight" not in sd:
        raise UserError(f"{path}: not a DiT state dict (no pos_embed / x_embedder.proj.weight)")
    hidden, patch, in_ch = sd["pos_embed"].shape[2], sd["x_embedder.proj.weight"].shape[2], sd["x_embedder.proj.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = {1152: 16, 1024: 16, 768: 12, 384: 6, 128: 4}.get(hidden, max(1, hidden // 64))
    out_ch = sd["final_layer.linear.weight"].shape[0] // patch ** 2
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1 if "y_embedder.embedding_table.weight" in sd else 0
    input_size = int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch
    with torch.device("meta"):  # skip the random init of up to 675M parameters: the file overwrites all of them
        model = DiT(input_size=input_size, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=heads,
                    num_classes=num_classes, learn_sigma=out_ch == 2 * in_ch)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, path)
    return model.float().to(device).eval()


def load_state_dict_strict(model, sd, path):
    """load_state_dict(strict=True), with one line that lists what does not fit instead of a traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def few(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        raise UserError(f"{path}: checkpoint does not fit the model: missing [{few(missing)}]; "
                        f"unexpected [{few(unexpected)}]; shape mismatches [{few(mismatched)}]")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------
# Diffusion: DDPM linear schedule, the loss, DDPM/DDIM samplers


class Diffusion:
    """Linear betas 1e-4..0.02 over T steps; gamma_t = sqrt(abar_t), delta_t = sqrt(1 - abar_t)."""
    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02, device="cpu"):
        self.T = T
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod = abar.float().to(device)
        self.gamma, self.delta = abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)

    def q_sample(self, z0, t, eps):
        return self.gamma[t].view(-1, 1, 1, 1) * z0 + self.delta[t].view(-1, 1, 1, 1) * eps

    def predict_z0(self, z_t, t, eps_hat):
        return (z_t - self.delta[t].view(-1, 1, 1, 1) * eps_hat) / self.gamma[t].view(-1, 1, 1, 1)


def step_generator(seed, step, device):
    """A generator seeded by (seed, step): the noise of a step is a pure function of it, so resume is exact."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return g


def draw_global(g, kind, n_local, dist, *shape, **kw):
    """Draw `kind` ("randn", "rand" or "randint" with high=...) for the GLOBAL batch from generator g and
    return this rank's rows, so N ranks see the same noise as one process with the same global batch."""
    n = n_local * dist.world_size
    if kind == "randint":
        x = torch.randint(0, kw["high"], (n, *shape), generator=g, device=g.device)
    else:
        x = getattr(torch, kind)((n, *shape), generator=g, device=g.device)
    return x[dist.rank * n_local:(dist.rank + 1) * n_local]


def diffusion_loss(model, diffusion, z0, step, seed, dist, y=None, class_dropout=0.0):
    """eps-prediction MSE, L = ||eps - g(z_t, r, t)||^2, with (t, eps, label dropout) drawn per step."""
    g, n = step_generator(seed, step, z0.device), z0.shape[0]
    t = draw_global(g, "randint", n, dist, high=diffusion.T)
    eps = draw_global(g, "randn", n, dist, *z0.shape[1:])
    drop = draw_global(g, "rand", n, dist) < class_dropout
    z_t = diffusion.q_sample(z0, t, eps)
    out = model(z_t, t, z0=z0, y=y, y_drop=drop if y is not None else None)
    return F.mse_loss(out[:, :z0.shape[1]].float(), eps)


@torch.no_grad()
def sample_loop(eps_fn, shape, diffusion, steps=50, method="ddim", device="cpu", generator=None, clip=None):
    """DDPM (ancestral, respaced to `steps`) or DDIM (eta = 0) from pure noise. eps_fn(x, t) -> eps."""
    ts = torch.linspace(diffusion.T - 1, 0, steps, device=device).round().long()
    abar = diffusion.alphas_cumprod
    x = torch.randn(shape, device=device, generator=generator)
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
        eps = eps_fn(x, t.expand(shape[0])).float()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if method == "ddim":
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:  # posterior q(x_prev | x_t, x0) of the respaced chain
            beta = 1 - a_t / a_prev
            mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
            var = beta * (1 - a_prev) / (1 - a_t)
            noise = torch.randn(shape, device=device, generator=generator)
            x = mean + (var.sqrt() * noise if i + 1 < len(ts) else 0)
    return x


# ----------------------------------------------------------------------------------------------
# Run utilities, shared by every method script: distributed set-up, training loop, checkpoints,
# logs, pictures, metrics, linear probes, FID


class Dist:
    def __init__(self, rank=0, world_size=1, local_rank=0, device="cpu"):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, torch.device(device)
        self.is_main = rank == 0


def setup_distributed(device_arg="auto"):
    """Plain python or torchrun: nccl on CUDA, gloo on CPU; one process per GPU."""
    cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if device_arg not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device must be auto, cuda or cpu, got {device_arg!r}")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        device = f"cuda:{local}" if cuda else "cpu"
    else:
        rank, world, local, device = 0, 1, 0, "cuda:0" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)  # an index: torch.device("cuda") without one is refused
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Dist(rank, world, local, device)


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_mean(x, dist):
    if dist.world_size > 1:
        x = x.clone()
        torch_dist.all_reduce(x)
        x /= dist.world_size
    return x


def resolve_amp(amp, device):
    """--amp auto means bf16 on CUDA and fp32 on the CPU (CPU autocast is slower than fp32 there)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return amp


def autocast(amp, device):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})")


def load_torch(path, what="checkpoint"):
    """torch.load(weights_only=True) with one clear line instead of a traceback: a pickle that would call
    anything else (os.system through __reduce__, ...) is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected a {what})") from None
    except Exception as e:
        text = str(e)
        if "GLOBAL " in text:  # torch names the callable it refused: "unsupported GLOBAL posix.system ..."
            raise UserError(f"{path}: refusing to unpickle {text.split('GLOBAL ', 1)[1].split()[0]} (a {what} holds only "
                            f"tensors and plain containers; loading this file would run code)") from None
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = next((s.strip() for s in text.splitlines() if s.strip() and not s.startswith(skip)), text.split("\n")[0])
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}: {reason[:200]})") from None


def save_checkpoint(ckpt_dir, model, ema=None, optimizer=None, step=0, config=None, extra=None):
    """Write model/EMA weights (safetensors), optimizer + step + RNG (torch.save of tensors and plain
    containers) and config.json into ckpt_dir atomically: a sibling .tmp folder is filled, then swapped in,
    so a crash leaves either the old checkpoint or the new one, never half of one."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    state = {"step": step, "torch_rng": torch.get_rng_state(), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, os.path.join(tmp, "state.pt"))
    save_json(os.path.join(tmp, "config.json"), config or {})
    if os.path.exists(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(ckpt_dir):
    """The checkpoint folder to read: ckpt_dir, or the .old copy a crash mid-swap left behind."""
    for d in (ckpt_dir, ckpt_dir + ".old"):
        if os.path.isfile(os.path.join(d, "model.safetensors")) and os.path.isfile(os.path.join(d, "config.json")):
            return d
    if os.path.isfile(ckpt_dir):
        raise UserError(f"{ckpt_dir}: expected a checkpoint folder (model.safetensors and config.json), got a file")
    raise UserError(f"{ckpt_dir}: no checkpoint here (expected model.safetensors and config.json)")


def load_weights(path, model, prefer_ema=True):
    """Load model (or EMA) weights of a checkpoint folder into `model`, strictly."""
    d = find_checkpoint(path)
    f = os.path.join(d, "ema.safetensors" if prefer_ema and os.path.exists(os.path.join(d, "ema.safetensors")) else "model.safetensors")
    try:
        sd = load_file(f)
    except Exception as e:
        raise UserError(f"{f}: unreadable safetensors file ({e})")
    load_state_dict_strict(model, sd, f)
    return model


class RunLog:
    """config.json, log.jsonl and metrics.json under out_dir, written by rank 0 only."""
    def __init__(self, out_dir, dist, config=None):
        self.out_dir, self.dist = out_dir, dist
        if dist.is_main:
            os.makedirs(out_dir, exist_ok=True)
            if config is not None:
                save_json(os.path.join(out_dir, "config.json"), config)

    def log(self, record, echo=True):
        if not self.dist.is_main:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)

    def metrics(self, m):
        if self.dist.is_main:
            save_json(os.path.join(self.out_dir, "metrics.json"), m)

    def keep_until(self, step):
        """Drop log records after `step` (all of them for a fresh run, step 0): a run resumed from its last
        checkpoint re-logs the steps a crash cut short, and a new run in an old folder starts a new log."""
        path = os.path.join(self.out_dir, "log.jsonl")
        if not self.dist.is_main or not os.path.exists(path):
            return
        def before(line):  # a line a crash cut short (no newline, not JSON) is dropped too
            try:
                return line.endswith("\n") and json.loads(line).get("step", 0) <= step
            except ValueError:
                return False
        with open(path) as f:
            kept = [line for line in f if before(line)]
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def transformer_flops_per_image(model, tokens):
    """Training FLOPs per image of a transformer (nanoGPT's estimate): 6 * params * tokens for the
    matmuls plus 12 * layers * width * tokens^2 for attention scores (forward + backward)."""
    n = sum(p.numel() for p in model.blocks.parameters())
    return 6 * n * tokens + 12 * len(model.blocks) * model.blocks[0].attn.qkv.in_features * tokens ** 2


def fit(model, loss_fn, loader, args, dist, out_dir, config, flops_per_image=0.0, params=None):
    """The training loop every script uses: AdamW, warm-up, grad clipping, EMA, AMP, compile, DDP,
    atomic checkpoints every --ckpt-every steps, exact --resume, NaN stop, log.jsonl.

    loss_fn(net, x, y, step) -> scalar loss, where net is the (DDP/compiled) model. Returns (model, ema).
    """
    device = dist.device
    model.to(device).train()
    if dist.world_size > 1:
        # the scripts build their models from --seed alone, so every rank starts alike; the broadcast makes sure (DDP
        # would sync the model only, after the EMA copy below). Then each rank gets its own stream (seed x world +
        # rank); all of a step's randomness is drawn for the global batch from (seed, step), so N ranks == one process.
        for t in model.state_dict().values():
            torch_dist.broadcast(t, 0)
        torch.manual_seed(args.seed * dist.world_size + dist.rank)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=fused)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    start = 0
    if args.resume:
        d = find_checkpoint(ckpt_dir)
        load_weights(d, model, prefer_ema=False)
        load_weights(d, ema, prefer_ema=True)
        state = load_torch(os.path.join(d, "state.pt"), "training state (optimizer, step, RNG)")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        if dist.is_main:
            print(f"resumed from {d} at step {start}")
    net = model
    if args.compile:
        net = torch.compile(net)
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(enabled=amp == "fp16")
    log = RunLog(out_dir, dist, config)
    log.keep_until(start)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    ema_buffers, model_buffers = list(ema.buffers()), list(model.buffers())  # e.g. BatchNorm statistics
    loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = loader.batch(step)
        with autocast(amp, device):
            loss = loss_fn(net, x, y, step)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # EMA with a warm-up (Karras-style): early on it follows the model more closely
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, model_buffers)
        loss_sum += loss.detach()
        n_sum += 1
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            # a finite loss can still have a NaN/inf gradient (e.g. through torch.where's unselected branch), which
            # the update spreads to the weights: check them too before they are checkpointed (identical on every rank)
            finite = torch.stack([p.isfinite().all() for p in model_params]).all().float()
            mean_loss, weights_ok = torch.stack([all_reduce_mean(loss_sum / n_sum, dist), finite]).tolist()  # the only host sync, on log steps
            if not math.isfinite(mean_loss):
                where = f"step {step + 1}" if n_sum == 1 else f"steps {step + 2 - n_sum}-{step + 1} (the log window's mean)"
                raise UserError(f"loss is {mean_loss} at {where}; stopped, last good checkpoint kept in {ckpt_dir}")
            if not weights_ok:
                raise UserError(f"weights are not finite after step {step + 1} (the loss was finite: a NaN/inf gradient); "
                                f"stopped, last good checkpoint kept in {ckpt_dir}")
            dt = time.time() - t0
            img_s = n_sum * args.batch_size / dt
            rec = {"step": step + 1, "loss": mean_loss, "lr": lr, "img_s": img_s}
            if flops_per_image and device.type == "cuda":
                rec["mfu"] = flops_per_image * img_s / (args.peak_tflops * 1e12 * dist.world_size)
            if device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            log.log(rec)
            loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.time()
            if dist.is_main and ((step + 1) % args.ckpt_every == 0 or last):
                save_checkpoint(ckpt_dir, model, ema, opt, step + 1, config)
    if dist.world_size > 1:
        torch_dist.barrier()
    return model, ema


def add_train_args(p, steps, batch_size, lr):
    """The training flags every script shares (same names everywhere)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch, across ranks")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval (rounded to log steps)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 peak for MFU (H100 SXM dense: 989)")


def add_common_args(p):
    p.add_argument("--data", default="shapes", help="shapes | cifar10 | cifar100 | tinyimagenet | a folder | a latents .safetensors")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--out-dir", default="runs/repcond")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")
    p.add_argument("--vae-path", default=None, help="SD VAE file: encode images to latents on the fly (else pixel space)")


def accuracy_f1(pred, target, num_classes):
    """Accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted)."""
    pred, target = pred.cpu().long(), target.cpu().long()
    cm = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = cm.diag().float()
    f1 = 2 * tp / (cm.sum(0) + cm.sum(1)).float().clamp(min=1)
    present = (cm.sum(1) + cm.sum(0)) > 0
    return (tp.sum() / cm.sum().clamp(min=1)).item(), f1[present].mean().item(), cm


def linear_probe(train_x, train_y, test_x, test_y, num_classes, steps=500, lr=1e-2, weight_decay=1e-4):
    """Logistic regression on standardised features, full-batch Adam; returns test accuracy."""
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(head(train_x), train_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def _font():
    from PIL import ImageFont
    return ImageFont.load_default()


def save_image_grid(images, path, nrow=8):
    """images: uint8 (N, C, H, W) or float in [-1, 1] -> one PNG grid."""
    data.save_grid(images if images.dtype == torch.uint8 else data.to_uint8(images), path, nrow=min(nrow, len(images)))


def save_heatmap(matrix, path, row_labels, col_labels, title="", fmt="{:.2f}"):
    """A labelled heat map (confusion matrices, probe grids) drawn with pillow."""
    from PIL import Image, ImageDraw
    m = np.asarray(matrix, dtype=np.float64)
    R, C = m.shape
    cell, left, top = 44, 8 + 7 * max(len(str(s)) for s in row_labels), 40 + 7 * max(len(str(s)) for s in col_labels) // 2
    img = Image.new("RGB", (left + C * cell + 10, top + R * cell + 10), "white")
    d, font = ImageDraw.Draw(img), _font()
    d.text((left, 4), title, fill="black", font=font)
    lo, hi = np.nanmin(m), np.nanmax(m)
    for i in range(R):
        d.text((4, top + i * cell + cell // 2 - 5), str(row_labels[i]), fill="black", font=font)
        for j in range(C):
            v = 0.0 if hi == lo else (m[i, j] - lo) / (hi - lo)
            colour = (int(255 * (1 - v)), int(255 * (1 - 0.6 * v)), 255)
            d.rectangle([left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1], fill=colour)
            d.text((left + j * cell + 3, top + i * cell + cell // 2 - 5), fmt.format(m[i, j]), fill="black", font=font)
    for j in range(C):
        d.text((left + j * cell + 3, 22), str(col_labels[j])[:7], fill="black", font=font)
    img.save(path)


def save_curve(xs, series, path, xlabel="", ylabel="", title=""):
    """Line plot of one or more series {name: ys} over xs, drawn with pillow."""
    from PIL import Image, ImageDraw
    W, H, pad = 520, 360, 50
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), _font()
    ys_all = [y for ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    lo, hi = (min(ys_all), max(ys_all)) if ys_all else (0, 1)
    hi = hi if hi > lo else lo + 1
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def pt(x, y):
        return pad + (x - x_lo) / (x_hi - x_lo) * (W - 2 * pad), H - pad - (y - lo) / (hi - lo) * (H - 2 * pad)
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.text((pad, 10), title, fill="black", font=font)
    d.text((W // 2 - 20, H - 20), xlabel, fill="black", font=font)
    d.text((4, pad - 20), ylabel, fill="black", font=font)
    d.text((4, pad), f"{hi:.3g}", fill="black", font=font)
    d.text((4, H - pad - 10), f"{lo:.3g}", fill="black", font=font)
    for x in xs:
        d.text((pt(x, lo)[0] - 8, H - pad + 4), f"{x:g}", fill="black", font=font)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for k, (name, ys) in enumerate(series.items()):
        c = colours[k % len(colours)]
        pts = [pt(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        d.text((W - pad - 110, pad + 6 + 14 * k), name, fill=c, font=font)
    img.save(path)


def compute_fid(real, fake, work_dir, device, feature_extractor=None):
    """FID between two uint8 (N, 3, H, W) image sets through clean-fid (PNG folders, its "clean" resize).

    feature_extractor=None uses clean-fid's Inception (weights are downloaded once by clean-fid);
    tests pass a small module mapping (N, 3, 299, 299) floats in [0, 255] to (N, D) features.
    """
    from PIL import Image
    from cleanfid import fid as cleanfid
    dirs = []
    for name, imgs in (("real", real), ("fake", fake)):
        d = os.path.join(work_dir, f"fid_{name}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for i, im in enumerate(imgs.cpu()):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(d, f"{i:06d}.png"))
        dirs.append(d)
    score = cleanfid.compute_fid(dirs[0], dirs[1], mode="clean", device=torch.device(device), num_workers=0,
                                 custom_feat_extractor=feature_extractor, verbose=False, use_dataparallel=False)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return float(score)


# ----------------------------------------------------------------------------------------------
# Where the diffusion runs: pixels, cached VAE latents, or latents encoded on the fly


POSTERIOR_STREAM = 2 * 10 ** 6  # seed offset of the VAE posterior noise (t and eps use the seed itself)


class Space:
    """Maps loader batches to the diffusion's z0 and back to images.

    Pixel space: z0 = x in [-1, 1]. A latents file (`vae.py encode`): the loader already returns
    scaled latents. An image data set with --vae-path: z0 = vae.encode(x).sample() * scaling_factor,
    computed on the fly under no_grad (bf16 on CUDA); decoding needs the VAE in both latent cases.
    """
    def __init__(self, ds, vae_path, device, amp="none"):
        self.vae, self.kind, self.amp, self.device = None, "pixel", amp, device
        self.scaling_factor = ds.scaling_factor
        if ds.latents is not None:
            self.kind = "latents"
        if vae_path not in (None, "", "none"):
            import vae as vae_lib
            self.vae = vae_lib.load(vae_path, device=device).eval().requires_grad_(False)
            if ds.latents is None:
                self.kind, self.scaling_factor = "vae", self.vae.scaling_factor
        C, H, W = ds.sample_shape
        if self.kind == "vae":
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
            return self.vae.decode(z / self.scaling_factor).float().clamp(-1, 1)


def load_run(ckpt, device, vae_path=None, data_spec=None, split="train"):
    """A checkpoint folder -> (model with EMA weights, its config, data set, Space)."""
    d = find_checkpoint(ckpt)
    cfg = load_json(os.path.join(d, "config.json"))
    if "model" not in cfg or "sample_shape" not in cfg:
        raise UserError(f"{d}: config.json is not a repcond_dit checkpoint config")
    model = load_weights(d, build_model(cfg)).to(device).eval()
    ds = data.load(data_spec or cfg["data"], split, cfg.get("image_size"))
    space = Space(ds, vae_path or cfg.get("vae_path"), device, resolve_amp(cfg.get("amp", "auto"), device))
    if tuple(space.sample_shape) != tuple(cfg["sample_shape"]):
        raise UserError(f"--data {data_spec or cfg['data']}: samples are {tuple(space.sample_shape)}, "
                        f"the checkpoint {d} was trained on {tuple(cfg['sample_shape'])}")
    return model, cfg, ds, space


@torch.no_grad()
def eval_denoise_loss(model, space, ds, diffusion, device, n=512, batch_size=128, seed=0):
    """Held-out eps-MSE with fixed (t, eps) per batch: comparable across runs of the same data."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    total, count = 0.0, 0
    for b, (x, _, _) in enumerate(data.iterate(ds.subset(idx), batch_size, device)):
        z0 = space.encode(x, generator=False)
        g = step_generator(seed, b, device)
        t = torch.randint(0, diffusion.T, (len(z0),), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        out = model(diffusion.q_sample(z0, t, eps), t, z0=z0)
        total += F.mse_loss(out[:, :z0.shape[1]].float(), eps, reduction="sum").item()
        count += eps.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# Stages


def _compile_default(args, dist):
    if args.compile is None:
        args.compile = dist.device.type == "cuda"


def pretrain(args):
    """Joint training of f_phi and g_theta on unlabeled data (labels, if any, are never read)."""
    dist = setup_distributed(args.device)
    _compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    ds = data.load(args.data, "train", args.image_size)
    space = Space(ds, args.vae_path, dist.device, resolve_amp(args.amp, dist.device))
    cfg = dict(stage="pretrain", model=args.model, encoder=args.encoder, rep_dim=args.rep_dim, inject=args.inject, cond=args.cond,
               sample_shape=list(space.sample_shape), num_classes=0, learn_sigma=False, T=args.T, data=args.data,
               image_size=args.image_size, vae_path=args.vae_path, scaling_factor=space.scaling_factor, classes=ds.classes,
               freeze_encoder=args.freeze_encoder, amp=args.amp, args=vars(args))
    if args.model not in DiT_models or (args.cond == "rep" and args.encoder not in ViT_models):
        raise UserError(f"--model must be one of {sorted(DiT_models)} and --encoder one of {sorted(ViT_models)}")
    if space.sample_shape[1] % DiT_models[args.model]["patch_size"]:
        raise UserError(f"--model {args.model}: patch size does not divide the input size {space.sample_shape[1]}")
    model = build_model(cfg)
    if args.encoder_ckpt and not args.freeze_encoder:  # it would be ignored: say so rather than train from scratch
        raise UserError(f"--encoder-ckpt {args.encoder_ckpt}: only read with --freeze-encoder (add it, or drop --encoder-ckpt)")
    if args.freeze_encoder:
        if args.cond != "rep":
            raise UserError("--freeze-encoder needs --cond rep")
        if args.encoder_ckpt:  # a frozen pre-trained encoder; without one it stays at its random init
            enc_cfg = load_json(os.path.join(find_checkpoint(args.encoder_ckpt), "config.json"))
            donor = load_weights(args.encoder_ckpt, build_model(enc_cfg))
            if donor.encoder is None:
                raise UserError(f"--encoder-ckpt {args.encoder_ckpt}: that checkpoint has no encoder")
            load_state_dict_strict(model.encoder, donor.encoder.state_dict(), args.encoder_ckpt)
        model.encoder.requires_grad_(False)
    loader = data.Loader(ds, args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)
    diffusion = Diffusion(args.T, device=dist.device)
    tokens = (space.sample_shape[1] // model.denoiser.patch_size) ** 2
    flops = transformer_flops_per_image(model.denoiser, tokens)
    if model.encoder is not None:
        flops += transformer_flops_per_image(model.encoder, (space.sample_shape[1] // model.encoder.patch_size) ** 2)

    def loss_fn(net, x, y, step):
        return diffusion_loss(net, diffusion, space.sample_z0(x, args.seed, step, dist), step, args.seed, dist)
    model, ema = fit(model, loss_fn, loader, args, dist, args.out_dir, cfg, flops_per_image=flops)
    test = data.load(args.data, "test", args.image_size)
    loss = eval_denoise_loss(ema, space, test, diffusion, dist.device, seed=args.seed)
    metrics = {"eval_loss": loss, "cond": args.cond, "inject": args.inject if args.cond == "rep" else None, "steps": args.steps}
    RunLog(args.out_dir, dist).metrics(metrics)
    if dist.is_main:
        print(f"pretrain done: held-out eps-MSE {loss:.4g} (cond {args.cond})")
    return metrics


@torch.no_grad()
def class_mean_embeddings(pre, space, ds, device, batch_size=256):
    """rep_embedder(f_phi(z0)) averaged per class over the labeled set: the tuned label table's start.
    Row k makes label k act like the mean representation of class k; the null row is the overall mean."""
    sums = torch.zeros(ds.num_classes, pre.denoiser.hidden_size, device=device)
    counts = torch.zeros(ds.num_classes, device=device)
    for x, y, _ in data.iterate(ds, batch_size, device):
        _, r = pre.encoder(space.encode(x, generator=False))
        sums.index_add_(0, y, pre.denoiser.rep_embedder(r).float())
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    means = sums / counts.clamp(min=1)[:, None]
    return torch.cat([means, (sums.sum(0) / counts.sum().clamp(min=1))[None]])  # (K + 1, D)


def tune(args):
    """Swap representation conditioning for labels (encoder dropped, label embedder added) and fine-tune."""
    dist = setup_distributed(args.device)
    _compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    pre, pcfg, ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data_override)
    if not ds.classes or ds.labels is None:
        raise UserError(f"--data {pcfg['data']}: tune needs a labeled data set")
    labeled = data.labeled_subset(ds, labels_per_class=args.labels_per_class, fraction=args.labeled_fraction, seed=args.seed)
    cfg = dict(pcfg, stage="tune", cond="label", num_classes=len(ds.classes), rep_dim=0, inject=None,
               class_dropout=args.class_dropout, init_from=args.ckpt, n_labeled=len(labeled), args=vars(args))
    cfg["data"] = args.data_override or pcfg["data"]
    model = build_model(cfg)
    own = model.denoiser.state_dict()
    carried = {k: v for k, v in pre.denoiser.state_dict().items() if k in own}  # all but rep_embedder.*, map_embedder.*
    missing = [k for k in own if k not in carried]
    assert all(k.startswith("y_embedder.") for k in missing), missing
    model.denoiser.load_state_dict(carried, strict=False)
    if pre.encoder is not None and pre.denoiser.rep_dim > 0 and args.label_init == "rep-mean":
        model.denoiser.y_embedder.embedding_table.weight.data.copy_(class_mean_embeddings(pre, space, labeled.to(dist.device), dist.device).cpu())
    del pre
    loader = data.Loader(labeled, args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)
    diffusion = Diffusion(cfg["T"], device=dist.device)
    flops = transformer_flops_per_image(model.denoiser, (space.sample_shape[1] // model.denoiser.patch_size) ** 2)

    def loss_fn(net, x, y, step):
        return diffusion_loss(net, diffusion, space.sample_z0(x, args.seed, step, dist), step, args.seed, dist, y=y,
                              class_dropout=args.class_dropout)
    fit(model, loss_fn, loader, args, dist, args.out_dir, cfg, flops_per_image=flops)
    RunLog(args.out_dir, dist).metrics({"n_labeled": len(labeled), "steps": args.steps})
    return cfg


@torch.no_grad()
def dc0_errors(model, diffusion, z0, t, num_classes, n_noise, generator, max_batch=2048):
    """Diffusion Classifier Zero errors ||z0 - z0'(c)||^2 (mean over C, H, W): (B, K), averaged over
    n_noise draws. Each draw noises every image once and shares that eps across all K labels."""
    B = z0.shape[0]
    errs = torch.zeros(B, num_classes, device=z0.device)
    labels = torch.arange(num_classes, device=z0.device)
    for _ in range(n_noise):
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        tt = torch.full((B,), t, device=z0.device, dtype=torch.long)
        z_t = diffusion.q_sample(z0, tt, eps)
        per = max(1, max_batch // num_classes)  # images per forward, each with all K labels
        for s in range(0, B, per):
            zt_rep = z_t[s:s + per].repeat_interleave(num_classes, 0)  # (b*K, C, H, W)
            y = labels.repeat(zt_rep.shape[0] // num_classes)
            t_rep = tt[s:s + per].repeat_interleave(num_classes)
            eps_hat = model.denoiser(zt_rep, t_rep, y=y)[:, :z0.shape[1]].float()
            z0_hat = diffusion.predict_z0(zt_rep, t_rep, eps_hat)
            err = (z0[s:s + per].repeat_interleave(num_classes, 0) - z0_hat).pow(2).flatten(1).mean(1)
            errs[s:s + per] += err.view(-1, num_classes)
    return errs / n_noise


def gather_by_index(values, idx, n, dist):
    """Reassemble per-rank rows (values[i] belongs to sample idx[i]) into one (n, ...) tensor on every rank."""
    out = torch.zeros((n, *values.shape[1:]), device=values.device, dtype=values.dtype)
    out[idx] = values
    if dist.world_size > 1:
        torch_dist.all_reduce(out)  # every sample is owned by exactly one rank
    return out


@torch.no_grad()
def dc0_sweep(model, space, ds, diffusion, ts, n_noise, seed, dist, batch_size, max_batch):
    """Errors (len(ts), N, K) of DC0 on a data set, sharded over ranks."""
    K, N = model.denoiser.num_classes, len(ds)
    out = torch.zeros(len(ts), N, K, device=dist.device)
    for i, t in enumerate(ts):
        rows = [torch.zeros(0, K, device=dist.device)]  # a rank may get no images
        idxs = [torch.zeros(0, dtype=torch.long, device=dist.device)]
        for x, _, idx in data.iterate(ds, batch_size, dist.device, rank=dist.rank, world_size=dist.world_size):
            g = step_generator(seed + 7919 * t, int(idx[0]), dist.device)  # noise depends on (seed, t, first index)
            rows.append(dc0_errors(model, diffusion, space.encode(x, generator=False), t, K, n_noise, g, max_batch))
            idxs.append(idx.to(dist.device))
        out[i] = gather_by_index(torch.cat(rows), torch.cat(idxs), N, dist)
    return out


def classify(args):
    """Diffusion Classifier Zero over a timestep sweep; t is chosen on a validation split, reported on test."""
    dist = setup_distributed(args.device)
    model, cfg, train_ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data_override)
    if cfg.get("num_classes", 0) <= 0:
        raise UserError(f"--ckpt {args.ckpt}: classify needs a label-conditioned checkpoint (run `tune` first)")
    K = cfg["num_classes"]
    test = data.load(args.data_override or cfg["data"], "test", cfg.get("image_size"))
    if test.labels is None:
        raise UserError("classify needs a labeled test split")
    g = torch.Generator().manual_seed(args.seed)
    if args.n_test and args.n_test < len(test):
        test = test.subset(torch.randperm(len(test), generator=g)[:args.n_test])
    val = train_ds.subset(torch.randperm(len(train_ds), generator=g)[:args.n_val]) if args.n_val > 0 else None
    diffusion = Diffusion(cfg["T"], device=dist.device)
    ts = sorted(set(args.t))
    if any(t < 0 or t >= diffusion.T for t in ts):
        raise UserError(f"--t values must lie in [0, {diffusion.T - 1}]")
    t0 = time.time()
    errs = dc0_sweep(model, space, test, diffusion, ts, args.n_noise, args.seed, dist, args.batch_size, args.max_batch)  # (T, N, K)
    seconds = time.time() - t0
    y = test.labels.to(dist.device)
    test_acc = [accuracy_f1(errs[i].argmin(1), y, K)[:2] for i in range(len(ts))]
    val_acc = None
    if val is not None:
        verrs = dc0_sweep(model, space, val, diffusion, ts, args.n_noise, args.seed + 1, dist, args.batch_size, args.max_batch)
        val_acc = [accuracy_f1(verrs[i].argmin(1), val.labels, K)[0] for i in range(len(ts))]
    score = val_acc or [a for a, _ in test_acc]
    bi = max(range(len(ts)), key=lambda i: (score[i], -ts[i]))
    acc, f1, cm = accuracy_f1(errs[bi].argmin(1), y, K)
    metrics = {"accuracy": acc, "macro_f1": f1, "best_t": ts[bi], "best_t_chosen_on": "val" if val is not None else "test",
               "chance": 1.0 / K, "n_test": len(test), "n_val": 0 if val is None else len(val), "n_noise": args.n_noise, "t": ts,
               "accuracy_per_t": {str(t): a for t, (a, _) in zip(ts, test_acc)},
               "macro_f1_per_t": {str(t): f for t, (_, f) in zip(ts, test_acc)},
               "val_accuracy_per_t": {str(t): a for t, a in zip(ts, val_acc)} if val_acc else {},
               "nfe_per_image": K * args.n_noise * len(ts), "img_s": len(test) / seconds}
    if dist.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        RunLog(args.out_dir, dist, dict(stage="classify", ckpt=args.ckpt, args=vars(args))).metrics(metrics)
        classes = cfg.get("classes") or [str(k) for k in range(K)]
        save_heatmap(cm.numpy(), os.path.join(args.out_dir, "confusion.png"), classes, classes,
                     title=f"DC0 confusion at t={ts[bi]} (rows: true)", fmt="{:.0f}")
        curves = {"test accuracy": [a for a, _ in test_acc], "test macro-F1": [f for _, f in test_acc]}
        if val_acc:
            curves["val accuracy"] = val_acc
        save_curve(ts, curves, os.path.join(args.out_dir, "sweep.png"), "t", "score", "Diffusion Classifier Zero: timestep sweep")
        print(f"DC0 accuracy {acc:.4f} macro-F1 {f1:.4f} at t={ts[bi]} (chance {1 / K:.4f}); per t: "
              + ", ".join(f"{t}:{a:.3f}" for t, (a, _) in zip(ts, test_acc)))
    return metrics


@torch.no_grad()
def encoder_features(model, space, ds, device, batch_size=256):
    feats = []
    for x, _, _ in data.iterate(ds, batch_size, device):
        feats.append(model.encoder(space.encode(x, generator=False))[1].float())
    return torch.cat(feats)


def probe(args):
    """Linear probe on the pre-trained encoder's pooled r: the self-supervised baseline for DC0."""
    dist = setup_distributed("cpu" if args.device == "cpu" else args.device)
    model, cfg, ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data_override)
    if model.encoder is None:
        raise UserError(f"--ckpt {args.ckpt}: probe needs a checkpoint with an encoder (a `pretrain --cond rep` run)")
    labeled = data.labeled_subset(ds, labels_per_class=args.labels_per_class, fraction=args.labeled_fraction, seed=args.seed)
    test = data.load(args.data_override or cfg["data"], "test", cfg.get("image_size"))
    ftr, fte = encoder_features(model, space, labeled, dist.device), encoder_features(model, space, test, dist.device)
    acc = linear_probe(ftr, labeled.labels.to(dist.device), fte, test.labels.to(dist.device), len(ds.classes))
    metrics = {"probe_accuracy": acc, "n_labeled": len(labeled), "chance": 1 / len(ds.classes)}
    if dist.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        RunLog(args.out_dir, dist, dict(stage="probe", ckpt=args.ckpt, args=vars(args))).metrics(metrics)
        print(f"linear probe on r: {acc:.4f} (chance {1 / len(ds.classes):.4f})")
    return metrics


def sample(args):
    """DDPM/DDIM samples conditioned on labels (CFG), on real images' representations, or unconditional."""
    dist = setup_distributed(args.device)
    model, cfg, ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data_override)
    diffusion = Diffusion(cfg["T"], device=dist.device)
    test = data.load(args.data_override or cfg["data"], "test", cfg.get("image_size"))
    n = args.n_fid if args.fid else args.n
    g = torch.Generator(device=dist.device).manual_seed(args.seed)
    den, enc = model.denoiser, model.encoder
    real_all = []
    samples = []
    for s in range(0, n, args.batch_size):
        b = min(args.batch_size, n - s)
        shape = (b, *space.sample_shape)
        if den.num_classes > 0:
            y = torch.arange(s, s + b, device=dist.device) % den.num_classes
            eps_fn = (lambda x, t: den.forward_with_cfg(x, t, y, args.cfg_scale)[:, :x.shape[1]]) if args.cfg_scale != 1 else \
                     (lambda x, t: den(x, t, y=y)[:, :x.shape[1]])
        elif enc is not None:  # condition on the representations of real test images
            x_real = data.to_float(test.images[torch.arange(s, s + b) % len(test)].to(dist.device)) if test.images is not None else None
            z_real = space.encode(x_real, generator=False) if x_real is not None else \
                test.latents["mean"][torch.arange(s, s + b) % len(test)].to(dist.device) * test.scaling_factor
            tokens, r = enc(z_real)
            m = enc.decode(tokens) if model.inject in ("both", "input") else None
            r = None if model.inject == "input" else r
            eps_fn = (lambda x, t: den(x, t, r=r, x_map=m)[:, :x.shape[1]])
            real_all.append(z_real)
        else:
            eps_fn = (lambda x, t: den(x, t)[:, :x.shape[1]])
        with autocast(resolve_amp(args.amp, dist.device), dist.device):
            z = sample_loop(eps_fn, shape, diffusion, args.sample_steps, args.sampler, dist.device, g,
                            clip=1.0 if space.kind == "pixel" else None)
        samples.append(z.float())
    z = torch.cat(samples)
    images = space.decode(z)
    metrics = {"n": n, "sampler": args.sampler, "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale}
    os.makedirs(args.out_dir, exist_ok=True)
    if images is None:
        save_file({"samples": z.cpu()}, os.path.join(args.out_dir, "samples.safetensors"))
        print("latent samples saved; pass --vae-path to decode them to images")
    else:
        save_image_grid(images[:64], os.path.join(args.out_dir, "samples.png"))
        if args.fid:
            real = test.images[:n] if test.images is not None else data.to_uint8(space.decode(test.latents["mean"][:n].to(dist.device) * test.scaling_factor))
            metrics["fid"] = compute_fid(real, data.to_uint8(images), args.out_dir, dist.device)
            metrics["fid_n"] = n
    if dist.is_main:
        RunLog(args.out_dir, dist, dict(stage="sample", ckpt=args.ckpt, args=vars(args))).metrics(metrics)
        print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------
# The bare run: pretrain -> tune -> classify on `shapes`, on the CPU, in minutes

PIPELINE = ["--model", "DiT-XS/4", "--encoder", "ViT-XS/4", "--rep-dim", "64"]
# Budget (2 CPU cores, about 5 minutes): shapes at 16x16 (4x4 = 16 tokens of patch 4) makes a training step 3x
# cheaper than at 32x32, and DC0 accuracy grows mostly with the label-tuning steps: on an H100 in fp32 (1000
# test images, one noise draw) 300 pretrain + 300 / 1000 / 3000 tune steps at 32px gave 0.25 / 0.35 / 0.43,
# while 1000 pretrain + 1000 tune gave 0.34. So the tune gets the larger share of the budget.


def pipeline(args):
    """python repcond_dit.py --out-dir D: the whole method on `shapes`, plus the unconditional baseline."""
    out, size = args.out_dir, args.image_size or 16
    common = ["--data", args.data, "--device", args.device, "--seed", str(args.seed)]
    train = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--log-every", "100"]
    pre = ["--steps", str(args.steps), "--image-size", str(size), *common, *PIPELINE, *train]
    r_pre = pretrain(build_parser().parse_args(["pretrain", "--out-dir", f"{out}/pretrain", *pre]))
    r_unc = pretrain(build_parser().parse_args(["pretrain", "--out-dir", f"{out}/pretrain_uncond", "--cond", "none", *pre]))
    lab = ["--labels-per-class", str(args.labels_per_class)]
    r_probe = probe(build_parser().parse_args(["probe", "--ckpt", f"{out}/pretrain/ckpt", "--out-dir", f"{out}/probe", *lab, "--device", args.device]))
    tune(build_parser().parse_args(["tune", "--ckpt", f"{out}/pretrain/ckpt", "--out-dir", f"{out}/tune", *common, *lab,
                                    "--steps", str(args.tune_steps), *train]))
    r_cls = classify(build_parser().parse_args(["classify", "--ckpt", f"{out}/tune/ckpt", "--out-dir", f"{out}/classify", "--device", args.device,
                                                "--n-test", str(args.n_test), "--n-noise", str(args.n_noise), "--t", *map(str, args.t)]))
    metrics = {"accuracy": r_cls["accuracy"], "macro_f1": r_cls["macro_f1"], "best_t": r_cls["best_t"], "chance": r_cls["chance"],
               "probe_accuracy": r_probe["probe_accuracy"], "pretrain_loss": r_pre["eval_loss"], "pretrain_loss_uncond": r_unc["eval_loss"],
               "accuracy_per_t": r_cls["accuracy_per_t"], "n_test": r_cls["n_test"], "n_labeled": r_probe["n_labeled"], "image_size": size}
    save_json(os.path.join(out, "metrics.json"), metrics)
    print(f"\nDC0 accuracy {metrics['accuracy']:.3f} (macro-F1 {metrics['macro_f1']:.3f}, t={metrics['best_t']}) | "
          f"linear probe on r {metrics['probe_accuracy']:.3f} | chance {metrics['chance']:.3f} | "
          f"held-out eps-MSE {metrics['pretrain_loss']:.4f} with r vs {metrics['pretrain_loss_uncond']:.4f} without")
    return metrics


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add_common_args(p)
    p.add_argument("--steps", type=int, default=600, help="pipeline: pretrain steps (each of the two runs)")
    p.add_argument("--tune-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--t", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--n-noise", type=int, default=2, help="pipeline: noise draws averaged per (image, t) in classify")
    sub = p.add_subparsers(dest="cmd")

    q = sub.add_parser("pretrain", help="joint encoder + denoiser training on unlabeled data", allow_abbrev=False)
    add_common_args(q)
    add_train_args(q, steps=400_000, batch_size=256, lr=1e-4)
    q.add_argument("--model", default="DiT-B/2", choices=sorted(DiT_models))
    q.add_argument("--encoder", default="ViT-S/2", choices=sorted(ViT_models))
    q.add_argument("--rep-dim", type=int, default=256)
    q.add_argument("--cond", default="rep", choices=["rep", "none"], help="none: the unconditional baseline")
    q.add_argument("--inject", default="both", choices=["both", "blocks", "input"],
                   help="both: the paper (decode map at the input + r in every block); blocks: pooled r only (bottleneck)")
    q.add_argument("--freeze-encoder", action="store_true", help="train the denoiser only (the paper's open question)")
    q.add_argument("--encoder-ckpt", default=None, help="with --freeze-encoder: take the encoder from this pretrain checkpoint")
    q.add_argument("--T", type=int, default=1000)
    q.add_argument("--no-augment", action="store_true")

    q = sub.add_parser("tune", help="replace representation conditioning by labels; fine-tune on a few labels", allow_abbrev=False)
    add_common_args(q)
    add_train_args(q, steps=20_000, batch_size=256, lr=1e-4)
    q.add_argument("--ckpt", required=True, help="a pretrain checkpoint folder (OUT_DIR/ckpt)")
    q.add_argument("--data-override", default=None, help="labeled data other than the pretrain data (same sample shape)")
    q.add_argument("--labels-per-class", type=int, default=None)
    q.add_argument("--labeled-fraction", type=float, default=None)
    q.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    q.add_argument("--label-init", default="rep-mean", choices=["rep-mean", "random"],
                   help="rep-mean: start label k at the class-mean representation embedding")
    q.add_argument("--no-augment", action="store_true")

    q = sub.add_parser("classify", help="Diffusion Classifier Zero, with a timestep sweep", allow_abbrev=False)
    add_common_args(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--data-override", default=None)
    q.add_argument("--t", type=int, nargs="+", default=[100, 200, 300, 400, 500, 600, 700, 800, 900])
    q.add_argument("--n-noise", type=int, default=1, help="noise draws averaged per (image, t)")
    q.add_argument("--n-test", type=int, default=0, help="classify a random subset of the test split (0: all)")
    q.add_argument("--n-val", type=int, default=200, help="train-split images used to choose t (0: choose on test)")
    q.add_argument("--batch-size", type=int, default=128, help="images per batch")
    q.add_argument("--max-batch", type=int, default=2048, help="denoiser batch (images x classes) per forward")

    q = sub.add_parser("probe", help="linear probe on the encoder's representation r", allow_abbrev=False)
    add_common_args(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--data-override", default=None)
    q.add_argument("--labels-per-class", type=int, default=None)
    q.add_argument("--labeled-fraction", type=float, default=None)

    q = sub.add_parser("sample", help="DDPM/DDIM samples, grid PNG, FID", allow_abbrev=False)
    add_common_args(q)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--data-override", default=None)
    q.add_argument("--n", type=int, default=64)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    q.add_argument("--sample-steps", type=int, default=50)
    q.add_argument("--cfg-scale", type=float, default=1.0)
    q.add_argument("--fid", action="store_true", help="FID (clean-fid, Inception) against the test split")
    q.add_argument("--n-fid", type=int, default=5000)
    return p


def main(args):
    stages = {"pretrain": pretrain, "tune": tune, "classify": classify, "probe": probe, "sample": sample, None: pipeline}
    try:
        return stages[args.cmd](args)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UserError as e:
        sys.exit(f"error: {e}")
