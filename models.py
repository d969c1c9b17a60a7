"""
The diffusion networks several methods share, in their official parameter layouts, with presets and loaders:
DiT (facebookresearch/DiT names, so `DiT-XL-2-256x256.pt` loads strictly), paper 000's ViT encoder and the
representation-conditioned DiT built on it, the DDPM / DDPM++ UNet (Ho et al.; EDM's DDPM++), the noise
schedules and objectives they are trained with (DDPM eps-prediction, EDM preconditioning) and the samplers.

Used by every method file: repcond_dit.py trains RepCondDiT, ddae_probe.py trains and probes the UNet (and
DiT), diffusion_classifier.py classifies with any class-conditional one, repfusion.py distils from them.
"""
import copy
import math
import os
import re
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import data
from cli import DiT_models, ViT_models
from data import UserError
from training import (draw_global, find_checkpoint, load_json, load_state_dict_strict, load_torch, load_weights, resolve_amp,
                      step_generator, strip_wrapper_prefixes)
from vae import read_state_dict, Space


# ----------------------------------------------------------------------------------------------
# DiT (official parameter names)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000, sin_first=False, freq_shift=0):
    """Sinusoidal embedding of (possibly fractional) timesteps, cat([cos, sin]) as in DiT/ADM. DDPM's original code
    (and diffusers' files of it) use cat([sin, cos]) (sin_first) and frequencies over half - 1 (freq_shift 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    args = t[:, None].float() * freqs[None]  # (N, half)
    sin_cos = (torch.sin(args), torch.cos(args))
    return torch.cat(sin_cos if sin_first else sin_cos[::-1], dim=-1)  # (N, dim)


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

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
        """Classifier-free guidance on eps: x (N, C, H, W) and t (N,) are the un-doubled batch, y (N,) its labels
        -> (N, out_C, H, W). guided_channels: how many leading output channels get eps_u + s (eps_c - eps_u)
        (None: all C of eps); the rest is the conditional prediction. The official DiT guides the first 3 of its
        4 latent channels (a quirk its release keeps for reproducibility): guided_channels=3 reproduces it."""
        null = torch.full_like(y, self.num_classes)
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, out_C, H, W)
        cond, uncond = out.chunk(2)
        k = self.in_channels if guided_channels is None else guided_channels
        return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Paper 000's model: the ViT encoder f_phi and the representation-conditioned DiT (here, not in repcond_dit.py,
# because its checkpoints are also teachers in repfusion.py and denoisers in diffusion_classifier.py); presets


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
    if isinstance(sd, dict) and ("ema" in sd or "model" in sd):  # a training checkpoint {"model", "ema", "opt", "args"}
        sd = sd.get("ema", sd.get("model"))
    if isinstance(sd, dict):
        sd = strip_wrapper_prefixes(sd)
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


# ----------------------------------------------------------------------------------------------
# The DDPM / DDPM++ / ADM UNet, every block addressable by name. One definition serves our own checkpoints and
# the public ones (diffusers UNet2DModel, guided-diffusion): the conventions that differ between them and that
# renaming cannot fix (time-embedding layout, GroupNorm groups/eps, heads, scale-shift norm, downsample padding,
# the resampling blocks' skip) are constructor options; the key renaming is in the loaders below.


def Normalize(channels, groups=32, eps=1e-6):
    """GroupNorm(groups); widths that `groups` does not divide (this project's tiny sizes) get channels // 4 groups."""
    return nn.GroupNorm(groups if channels % groups == 0 else min(groups, channels // 4), channels, eps=eps)


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, residual; `heads` heads of C / heads channels (DDPM: one head),
    scaled by (C / heads)^-0.5. The fused qkv rows are laid out (q|k|v, head, channel), as ADM's new order and
    diffusers' separate to_q/to_k/to_v concatenated; the output projection starts at zero."""
    def __init__(self, channels, skip_scale=1.0, heads=1, norm=Normalize):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.skip_scale, self.heads = skip_scale, heads

    def forward(self, x):
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(N, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, C / heads)
        return (x + self.proj_out(h.transpose(-1, -2).reshape(N, C, H, W))) * self.skip_scale


class GlobalDropout(nn.Dropout):
    """nn.Dropout whose training mask is drawn for the GLOBAL batch from a generator seeded alike on every rank at
    each step (_seed_step), of which this rank keeps its rows: under DDP, N processes drop exactly the units one
    process with the same global batch would (per-rank masks would not), and a resumed run draws the same masks."""
    rng = None  # (generator, dist) of the current training step; None: plain dropout from the global RNG

    def forward(self, x):
        if not self.training or self.p == 0 or GlobalDropout.rng is None:
            return super().forward(x)
        return x * self._keep(x) / (1 - self.p)

    @torch.compiler.disable  # a new generator every step: drawn eagerly, not traced (and re-traced) by torch.compile
    def _keep(self, x):
        return (draw_global(GlobalDropout.rng[0], "rand", x.shape[0], GlobalDropout.rng[1], *x.shape[1:]) >= self.p).to(x.device)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the (time [+ label]) embedding added in between, 1x1 skip when the shape
    changes, optional attention after it. resample="down"/"up" makes it the DDPM++ / ADM (BigGAN-style) resampling
    block: both paths are average-pooled / nearest-upsampled (EDM's [1, 1] resample filter) inside the block; its
    skip is a 1x1 conv (EDM's resample_proj) or, with resample_proj=False, the bare resampling (ADM).
    scale_shift=True is ADM's use_scale_shift_norm: the embedding gives (scale, shift) applied after the second
    norm as norm2(h) * (1 + scale) + shift, instead of being added before it."""
    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0, attn=False, resample=None, skip_scale=1.0,
                 scale_shift=False, resample_proj=True, heads=1, norm=Normalize):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = GlobalDropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch or (resample and resample_proj) else nn.Identity()
        self.attn = AttnBlock(out_ch, skip_scale, heads, norm) if attn else None
        self.res_out = nn.Identity()  # no weights: where a hook reads the res path before the attention (official names)
        self.resample, self.skip_scale, self.scale_shift, self.out_ch = resample, skip_scale, scale_shift, out_ch

    def _resample(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x, emb):
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h, e = self.conv1(h), self.emb(F.silu(emb))[:, :, None, None]  # (N, out_ch, H, W), (N, out_ch [x2], 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        x = self.res_out((self.skip(x) + h) * self.skip_scale)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """DDPM: a stride-2 3x3 conv. padding=0 is diffusers' downsample_padding 0 (the hub's DDPM files): one row and
    column of zeros on the bottom/right only, then the conv without padding (the tf original's "SAME" for even sizes)."""
    def __init__(self, channels, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.out_ch, self.pad_right = channels, padding == 0

    def forward(self, x, emb=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_right else x)


class Upsample(nn.Module):
    """DDPM: nearest x2, then a 3x3 conv."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out_ch = channels

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels, block):
        super().__init__()
        self.block1, self.block2 = block(channels, channels, attn=True), block(channels, channels)
        self.out_ch = channels

    def forward(self, x, emb):
        return self.block2(self.block1(x, emb), emb)


class UNet(nn.Module):
    """The DDPM UNet (Ho et al.), its DDPM++ variant (Song et al., as trained by EDM) and ADM (Dhariwal & Nichol).

    forward(x, t, y=None) -> eps (ddpm objective; ADM's learn_sigma adds out_channels - in_channels channels of
    the variance interpolant after it) or the raw network output F (edm objective): the objective decides what
    the output means. t: (N,) timesteps (DDPM) or c_noise (EDM), any float.
    num_classes > 0 adds a label embedding to the time embedding; with null_label, index num_classes is the null
    label (y=None means null), for classifier-free guidance dropout; without (ADM), y=None adds no label embedding.
    stop_at=NAME returns the activation of that block instead (truncated network, no output head).
    self.layers lists (name, channels, resolution) of every block, in forward order.

    The options after num_classes reproduce the public releases (the loaders set them): sin_first / freq_shift
    the time embedding ([sin, cos] with frequencies exp(-ln(10^4) i / (ch/2 - shift)) in DDPM's tf code and
    diffusers' files; [cos, sin] with shift 0 in ours, DiT and ADM), norm_groups / norm_eps every GroupNorm (ADM:
    eps 1e-5), head_channels / num_heads the attention heads (C / head_channels heads, else num_heads),
    scale_shift ADM's scale-shift norm, resample_proj the 1x1 conv on a resampling block's skip (EDM yes, ADM no),
    downsample_padding 0 diffusers' asymmetric downsample padding, out_channels 2 * in_channels ADM's learn_sigma.
    """
    def __init__(self, in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, resblock_updown=False, skip_scale=1.0, up_attn_last_only=False, num_classes=0,
                 null_label=True, out_channels=None, sin_first=False, freq_shift=0, norm_groups=32, norm_eps=1e-6,
                 head_channels=None, num_heads=1, scale_shift=False, resample_proj=True, downsample_padding=1):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, ch=ch, ch_mult=list(ch_mult),
                           num_res_blocks=num_res_blocks, attn_res=list(attn_res), dropout=dropout,
                           resblock_updown=resblock_updown, skip_scale=skip_scale, up_attn_last_only=up_attn_last_only,
                           num_classes=num_classes, null_label=null_label, out_channels=out_channels or in_channels,
                           sin_first=sin_first, freq_shift=freq_shift, norm_groups=norm_groups, norm_eps=norm_eps,
                           head_channels=head_channels, num_heads=num_heads, scale_shift=scale_shift,
                           resample_proj=resample_proj, downsample_padding=downsample_padding)
        emb_dim = 4 * ch
        self.ch, self.num_classes, self.stop_at = ch, num_classes, None
        self.temb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + int(null_label), emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        norm = partial(Normalize, groups=norm_groups, eps=norm_eps)
        res_block = partial(ResBlock, emb_dim=emb_dim, dropout=dropout, skip_scale=skip_scale, scale_shift=scale_shift,
                            resample_proj=resample_proj, norm=norm)

        def block(in_ch, out_ch, attn=False, resample=None):
            heads = out_ch // head_channels if head_channels else num_heads
            return res_block(in_ch, out_ch, attn=attn, resample=resample, heads=heads)
        down, skips, cur, res, self.layers = [], [ch], ch, image_size, []
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                down.append(block(cur, ch * mult, attn=res in attn_res))
                cur = ch * mult
                skips.append(cur)
                self.layers.append((f"down.{len(down) - 1}", cur, res))
            if i != len(ch_mult) - 1:
                down.append(block(cur, cur, resample="down") if resblock_updown else Downsample(cur, downsample_padding))
                res //= 2
                skips.append(cur)
                self.layers.append((f"down.{len(down) - 1}", cur, res))
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(cur, block)
        self.layers.append(("mid", cur, res))
        up = []
        for i, mult in reversed(list(enumerate(ch_mult))):
            for j in range(num_res_blocks + 1):
                attn = res in attn_res and (j == num_res_blocks or not up_attn_last_only)
                up.append(block(cur + skips.pop(), ch * mult, attn=attn))
                up[-1].cat_skip = True
                cur = ch * mult
                self.layers.append((f"up.{len(up) - 1}", cur, res))
            if i != 0:
                up.append(block(cur, cur, resample="up") if resblock_updown else Upsample(cur))
                res *= 2
                self.layers.append((f"up.{len(up) - 1}", cur, res))
        self.up = nn.ModuleList(up)
        self.out_norm = norm(cur)
        self.out_conv = nn.Conv2d(cur, out_channels or in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """DDPM's init: xavier-uniform weights, zero biases; the last conv of every res block, the attention
        output and the output conv start at zero, so each block starts as its skip path."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        if getattr(self, "out_conv", None) is not None:
            nn.init.zeros_(self.out_conv.weight)

    def layer_names(self):
        return [name for name, _, _ in self.layers]

    def layer(self, name):
        return self.get_submodule(name)

    def resolve_layer(self, name, flag="--layers"):
        """Our module path for `name`: one of ours (`up.7`, `mid.block2.conv2`) as is, or an official name that
        official_module translates (DDAE's `out_k`, diffusers' `mid_block.resnets.1.conv2`, guided-diffusion's
        `middle_block.2.out_layers.3`). Raises UserError (naming `flag`) for anything else."""
        try:
            self.get_submodule(name)
            return name
        except AttributeError:
            ours = official_module(self, name)
        if ours is None:
            raise UserError(f"{flag} {name}: not a layer of this UNet (blocks: {', '.join(self.layer_names())}; or an official "
                            f"name: DDAE's out_k, a diffusers or guided-diffusion module path)")
        return ours

    def block_of(self, path):
        """The block (`down.i`, `mid`, `up.i`) that holds module `path` (itself if it is one), or None (stem, head)."""
        return next((b for b in reversed(self.layer_names()) if path == b or path.startswith(b + ".")), None)

    def embed(self, t, y=None):
        c = self.config
        emb = self.temb(timestep_embedding(t, self.ch, sin_first=c["sin_first"], freq_shift=c["freq_shift"]))  # (N, 4ch)
        if self.label_emb is not None and (y is not None or c["null_label"]):
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, t, y=None, stop_at=None):
        stop_at = stop_at or self.stop_at
        emb = self.embed(t, y)
        h = self.stem(x)  # (N, ch, H, W)
        hs = [h]
        for i, m in enumerate(self.down):
            h = m(h, emb)
            hs.append(h)
            if stop_at == f"down.{i}":
                return h
        h = self.mid(h, emb)  # (N, C_mid, H_min, W_min)
        if stop_at == "mid":
            return h
        for i, m in enumerate(self.up):
            h = m(torch.cat([h, hs.pop()], dim=1), emb) if getattr(m, "cat_skip", False) else m(h, emb)
            if stop_at == f"up.{i}":
                return h
        return self.out_conv(F.silu(self.out_norm(h)))  # (N, C_in, H, W)

    def truncated(self, name):
        """A copy that ends at block `name` (its output, unpooled); the blocks after it are removed, so DDP
        sees no unused parameters and fine-tuning touches only what the features depend on."""
        if name not in self.layer_names():
            raise UserError(f"--layer {name}: not a layer of this UNet (one of {', '.join(self.layer_names())})")
        net = copy.deepcopy(self)
        kind, _, idx = name.partition(".")
        if kind == "down":
            net.down = net.down[:int(idx) + 1]
            net.mid = None
        if kind != "up":
            net.up = nn.ModuleList()
        else:
            net.up = net.up[:int(idx) + 1]
        net.out_norm = net.out_conv = None
        net.stop_at = name
        net.layers = [layer for layer in self.layers[:self.layer_names().index(name) + 1]]
        return net


# ----------------------------------------------------------------------------------------------
# Public UNet checkpoints: diffusers UNet2DModel folders (google/ddpm-cifar10-32, google/ddpm-ema-celebahq-256, ...)
# and guided-diffusion (ADM) files (64x64_diffusion.pt, ...), renamed into UNet's layout and loaded strictly.
# One translation of module paths serves the weights and the layer names each paper writes.
#
# Block indices: with L res blocks per level, encoder level i holds res block j at down.(i(L+1) + j) and its
# downsampler at down.(i(L+1) + L); decoder level r (counted from the coarsest, as diffusers' up_blocks.r) holds
# res block j at up.(r(L+2) + j) and its upsampler at up.(r(L+2) + L + 1). ADM's input_blocks.k is down.(k-1); its
# output_blocks.k (k = r(L+1) + j) is res block j of decoder level r, followed in the same module by its attention
# and, for j = L, the upsampler.

_RES_LEAVES = {"time_emb_proj": "emb", "conv_shortcut": "skip",  # diffusers; norm1/conv1/norm2/conv2 keep their names
               "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb", "out_layers.0": "norm2",
               "out_layers.3": "conv2", "skip_connection": "skip"}  # guided-diffusion
_ATTN_LEAVES = {"group_norm": "norm", "to_out.0": "proj_out", "proj_attn": "proj_out"}  # q, k, v: see _from_diffusers
_RESAMPLE_LEAVES = {"op": "conv"}  # ADM's Downsample conv
_QKV = {"to_q": 0, "query": 0, "to_k": 1, "key": 1, "to_v": 2, "value": 2}  # diffusers' current and pre-2023 names
_FIXED = {"conv_in": "stem", "time_embedding.linear_1": "temb.0", "time_embedding.linear_2": "temb.2",
          "conv_norm_out": "out_norm", "conv_out": "out_conv", "mid_block": "mid",
          "input_blocks.0.0": "stem", "time_embed.0": "temb.0", "time_embed.2": "temb.2", "label_emb": "label_emb",
          "middle_block": "mid", "out.0": "out_norm", "out.2": "out_conv"}


def _official_block(net, path):
    """(our block path, kind in res/attn/resample/plain, rest of `path`) for the block-level prefix of an official
    module path, or None."""
    L, n = net.config["num_res_blocks"], len(net.config["ch_mult"])

    def kind(p):
        return "res" if isinstance(net.get_submodule(p), ResBlock) else "resample"

    def adm_out(k, sub):  # output_blocks.k[.sub]: res block j of decoder level r [, its attention] [, the upsampler]
        r, j = divmod(k, L + 1)
        res = f"up.{r * (L + 2) + j}"
        up = f"up.{r * (L + 2) + L + 1}" if j == L and r < n - 1 else None
        if sub is None:
            return up or res, "plain"  # the whole output block ends with its last module
        subs = [(res, "res")] + [(res + ".attn", "attn")] * (net.get_submodule(res).attn is not None)
        subs += [(up, kind(up))] if up else []
        return subs[sub] if sub < len(subs) else (None, None)

    patterns = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)", lambda i, j: (f"down.{i * (L + 1) + j}", "res")),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)", lambda i, j: (f"down.{i * (L + 1) + j}.attn", "attn")),
        (r"down_blocks\.(\d+)\.downsamplers\.0", lambda i: (f"down.{i * (L + 1) + L}", "resample")),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)", lambda r, j: (f"up.{r * (L + 2) + j}", "res")),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)", lambda r, j: (f"up.{r * (L + 2) + j}.attn", "attn")),
        (r"up_blocks\.(\d+)\.upsamplers\.0", lambda r: (f"up.{r * (L + 2) + L + 1}", "resample")),
        (r"mid_block\.resnets\.([01])", lambda j: (f"mid.block{j + 1}", "res")),
        (r"mid_block\.attentions\.0", lambda: ("mid.block1.attn", "attn")),
        (r"middle_block\.([02])", lambda j: (f"mid.block{j // 2 + 1}", "res")),
        (r"middle_block\.1", lambda: ("mid.block1.attn", "attn")),
        (r"input_blocks\.([1-9]\d*)\.0", lambda k: (f"down.{k - 1}", kind(f"down.{k - 1}"))),
        (r"input_blocks\.([1-9]\d*)\.1", lambda k: (f"down.{k - 1}.attn", "attn")),
        (r"input_blocks\.([1-9]\d*)", lambda k: (f"down.{k - 1}", "plain")),
        (r"output_blocks\.(\d+)\.(\d+)", lambda k, s: adm_out(k, s)),
        (r"output_blocks\.(\d+)", lambda k: adm_out(k, None)),
    ]
    for pattern, target in patterns:
        m = re.match(pattern + r"(?:\.|$)", path)
        if m:
            try:
                ours, kd = target(*(int(g) for g in m.groups()))
                if ours is None:
                    return None
                net.get_submodule(ours)
            except (AttributeError, IndexError, TypeError):
                return None
            return ours, kd, path[m.end():]
    return None


def official_module(net, path):
    """A module path of a diffusers UNet2DModel (`mid_block.resnets.1.conv2`), a guided-diffusion UNetModel
    (`middle_block.2.out_layers.3`) or DDAE's decoder name `out_k` -> the same module of `net` (a UNet) as our path
    (`mid.block2.conv2`; `out_k` is the k-th res block of the decoder, counted from 1 with the resamplers skipped, as
    FutureXiang/ddae's model/unet.py), or None if it names no module of `net`."""
    if m := re.fullmatch(r"out_(\d+)", path):
        res = [f"up.{i}" for i, b in enumerate(net.up) if getattr(b, "cat_skip", False)]
        return res[int(m.group(1)) - 1] if 1 <= int(m.group(1)) <= len(res) else None
    if path in _FIXED:
        return _FIXED[path]
    found = _official_block(net, path)
    if found is None:
        return None
    ours, kind, rest = found
    if kind == "res" and not rest and getattr(net.get_submodule(ours), "attn", None) is not None:
        return ours + ".res_out"  # their res block ends before the attention that ours holds
    if rest:
        leaves = {"res": _RES_LEAVES, "attn": _ATTN_LEAVES, "resample": _RESAMPLE_LEAVES}.get(kind, {})
        ours = f"{ours}.{leaves.get(rest, rest)}"
    try:
        net.get_submodule(ours)
    except AttributeError:
        return None
    return ours


def _to_conv1x1(v):
    """A Linear (C_out, C_in) or Conv1d (C_out, C_in, 1) weight as our Conv2d's (C_out, C_in, 1, 1); biases unchanged."""
    return v.reshape(*v.shape[:2], 1, 1) if v.dim() >= 2 else v


def _from_diffusers(sd, net):
    """A diffusers UNet2DModel state dict -> our keys. Attention's separate q/k/v Linears (to_q or query, ...) are
    stacked into the 1x1 qkv conv, (q|k|v, head, channel) as AttnBlock reads it. Unknown keys pass through (and are
    then reported as unexpected)."""
    out, qkv = {}, {}
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        base, _, last = mod.rpartition(".")
        if last in _QKV and (attn := official_module(net, base)) is not None:
            qkv.setdefault((attn, leaf), [None] * 3)[_QKV[last]] = (k, v)
            continue
        ours = official_module(net, mod)
        if ours is None:
            out[k] = v
            continue
        out[f"{ours}.{leaf}"] = _to_conv1x1(v) if ours.endswith(".proj_out") else v
    for (attn, leaf), parts in qkv.items():
        if any(p is None for p in parts):  # incomplete: leave them as they are, to be listed as unexpected
            out.update(dict(p for p in parts if p is not None))
        else:
            out[f"{attn}.qkv.{leaf}"] = _to_conv1x1(torch.cat([v for _, v in parts]))
    return out


def _from_adm(sd, net, new_order):
    """A guided-diffusion UNetModel state dict -> our keys. Conv1d attention weights become 1x1 Conv2d; with the
    legacy attention order (new_order False: heads split before q/k/v) the qkv rows (head, q|k|v, channel) are
    permuted to our (q|k|v, head, channel), which computes the same function."""
    out = {}
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        ours = official_module(net, mod)
        if ours is None:
            out[k] = v
            continue
        if ours.endswith((".qkv", ".proj_out")):
            v = _to_conv1x1(v)
        if ours.endswith(".qkv") and not new_order:
            heads = net.get_submodule(ours[:-len(".qkv")]).heads
            v = v.reshape(heads, 3, -1, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        out[f"{ours}.{leaf}"] = v
    return out


_DIFFUSERS_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_DIFFUSERS_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# what UNet reproduces; a config that asks for anything else is refused (UNet2DModel's defaults where a key is absent)
_DIFFUSERS_FIXED = dict(time_embedding_type="positional", time_embedding_dim=None, act_fn="silu", center_input_sample=False,
                        class_embed_type=None, num_class_embeds=None, mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1,
                        resnet_time_scale_shift="default", add_attention=True, downsample_type="conv", upsample_type="conv")


def unet_kwargs_from_diffusers(c, where):
    """UNet(**kwargs) for a diffusers UNet2DModel config.json dict; UserError (naming `where`) for configs UNet does
    not reproduce. Absent keys take UNet2DModel's defaults (attention_head_dim 8, norm_eps 1e-5, freq_shift 0,
    flip_sin_to_cos True, downsample_padding 1), as diffusers itself would."""
    def refuse(what):
        raise UserError(f"{where}: {what} is not supported (UNet2DModel with Down/AttnDown and Up/AttnUp blocks, positional time "
                        f"embedding, default resnets, attention on the same levels down and up)")
    if c.get("_class_name", "UNet2DModel") != "UNet2DModel":
        refuse(f"_class_name {c.get('_class_name')!r}")
    for key, want in _DIFFUSERS_FIXED.items():
        if c.get(key, want) != want and not (key == "time_embedding_dim" and c[key] == 4 * c["block_out_channels"][0]):
            refuse(f"{key} {c[key]!r}")
    widths, L = list(c.get("block_out_channels", (224, 448, 672, 896))), c.get("layers_per_block", 2)
    down = c.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    up = c.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    for t in [t for t in down if t not in _DIFFUSERS_DOWN] + [t for t in up if t not in _DIFFUSERS_UP]:
        refuse(f"block type {t}")
    if not len(down) == len(up) == len(widths):
        refuse(f"{len(down)} down blocks, {len(up)} up blocks and {len(widths)} block_out_channels")
    if [_DIFFUSERS_DOWN[t] for t in down] != [_DIFFUSERS_UP[t] for t in reversed(up)]:
        refuse(f"attention at down levels {down} but up levels {up}")
    ch, groups, head = widths[0], c.get("norm_num_groups", 32), c.get("attention_head_dim", 8)
    if any(w % ch for w in widths) or any(w % groups for w in widths) or (head and any(w % head for w in widths)):
        refuse(f"block_out_channels {widths} with norm_num_groups {groups} and attention_head_dim {head}")
    if c.get("attn_norm_num_groups") not in (None, groups):
        refuse(f"attn_norm_num_groups {c['attn_norm_num_groups']}")
    size = c.get("sample_size") or 32
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            refuse(f"sample_size {size} (not square)")
        size = size[0]
    return dict(in_channels=c.get("in_channels", 3), out_channels=c.get("out_channels", 3), image_size=size, ch=ch,
                ch_mult=[w // ch for w in widths], num_res_blocks=L,
                attn_res=[size // 2 ** i for i, t in enumerate(down) if _DIFFUSERS_DOWN[t]], dropout=c.get("dropout", 0.0),
                sin_first=not c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0), norm_groups=groups,
                norm_eps=c.get("norm_eps", 1e-5), head_channels=head, downsample_padding=c.get("downsample_padding", 1))


def _diffusers_schedule(path):
    """{T, beta_range, schedule} from a scheduler_config.json (DDPMScheduler / DDIMScheduler), or DDPM's linear
    1e-4..0.02 over 1000 steps when there is none."""
    if path is None:
        return dict(T=1000, beta_range=[1e-4, 0.02], schedule="linear")
    s = load_json(path)
    kind, pred = s.get("beta_schedule", "linear"), s.get("prediction_type", "epsilon")
    if kind not in ("linear", "squaredcos_cap_v2") or s.get("trained_betas") is not None or pred != "epsilon":
        raise UserError(f"{path}: beta_schedule {kind!r} / prediction_type {pred!r} / trained_betas is not supported "
                        f"(linear or squaredcos_cap_v2 betas, epsilon prediction)")
    return dict(T=s.get("num_train_timesteps", 1000), beta_range=[s.get("beta_start", 1e-4), s.get("beta_end", 0.02)],
                schedule="linear" if kind == "linear" else "cosine")


def _diffusers_files(path):
    """(config.json, weights, scheduler_config.json or None) for a diffusers UNet2DModel folder, a pipeline folder
    (its unet/), or a diffusion_pytorch_model.safetensors/.bin file with config.json beside it; None otherwise."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(d, "config.json")) and os.path.isdir(os.path.join(d, "unet")):
        d = os.path.join(d, "unet")
    if not os.path.isfile(os.path.join(d, "config.json")):
        return None
    c = load_json(os.path.join(d, "config.json"))
    if not isinstance(c, dict) or not ({"_class_name", "_diffusers_version", "block_out_channels"} & set(c)):
        return None  # e.g. a training run's config.json
    if os.path.isdir(path):
        weights = next((os.path.join(d, f) for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                        if os.path.isfile(os.path.join(d, f))), None)
        if weights is None:
            raise UserError(f"{d}: diffusers folder without diffusion_pytorch_model.safetensors or .bin")
    elif path.endswith((".safetensors", ".bin")):
        weights = path
    else:
        return None
    beside, pipeline = os.path.join(d, "scheduler_config.json"), os.path.join(d, "..", "scheduler", "scheduler_config.json")
    sched = next((p for p in (beside, pipeline) if os.path.isfile(p)), None)
    return os.path.join(d, "config.json"), weights, sched


# guided-diffusion flags that the weights do not show, per release: (image size, base width, class-conditional) ->
# flags. Image size from the level count, as create_model picks channel_mult: 4 levels 64 px, 5 128 px, 6 256 px.
ADM_RELEASES = {
    (64, 192, True): dict(head_channels=64, new_order=True, schedule="cosine"),  # 64x64_diffusion.pt
    (128, 256, True): dict(num_heads=4, new_order=False, schedule="linear"),  # 128x128_diffusion.pt
    (256, 256, True): dict(head_channels=64, new_order=False, schedule="linear"),  # 256x256_diffusion.pt
    (256, 256, False): dict(head_channels=64, new_order=False, schedule="linear"),  # 256x256_diffusion_uncond.pt
}
ADM_SIZES = {4: 64, 5: 128, 6: 256}


def _adm_kwargs(sd, path, flags=None):
    """(UNet kwargs, new_order, schedule) of a guided-diffusion state dict: widths, levels, res blocks, attention
    levels, resblock_updown, scale-shift norm, classes and learn_sigma read off the shapes; heads, attention order and
    schedule from ADM_RELEASES or `flags` (dict with head_channels or num_heads, new_order, schedule, image_size)."""
    try:
        ch, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
        n_out = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k)))
        L = min(int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.[12]\.(in_layers|conv)\.", k)))
        n = n_out // (L + 1)
        widths = [sd[f"input_blocks.{i * (L + 1) + 1}.0.out_layers.3.weight"].shape[0] for i in range(n)]
        attn = [f"input_blocks.{i * (L + 1) + 1}.1.qkv.weight" in sd for i in range(n)]
        updown = f"input_blocks.{L + 1}.0.in_layers.0.weight" in sd
        scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * widths[0]
        out_ch = sd["out.2.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        raise UserError(f"{path}: not a guided-diffusion UNet state dict (input_blocks / middle_block / output_blocks)") from None
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0
    size = (flags or {}).get("image_size") or ADM_SIZES.get(n)
    release = ADM_RELEASES.get((size, ch, num_classes > 0))
    flags = dict(release or {}, **(flags or {}))
    heads_known = flags.get("head_channels") or flags.get("num_heads")
    if "schedule" not in flags or "new_order" not in flags or not heads_known or size is None:
        known = ", ".join(sorted({f"{s} px width {w}" for s, w, _ in ADM_RELEASES}))
        raise UserError(f"{path}: a guided-diffusion UNet of {n} levels, width {ch}, {num_classes} classes is not a known "
                        f"release (known: {known}); its heads, attention order and schedule cannot be read off the weights")
    if n_out % (L + 1) or any(w % ch for w in widths):
        raise UserError(f"{path}: output blocks {n_out} / widths {widths} do not form a guided-diffusion UNet")
    kw = dict(in_channels=in_ch, out_channels=out_ch, image_size=size, ch=ch, ch_mult=[w // ch for w in widths],
              num_res_blocks=L, attn_res=[size // 2 ** i for i in range(n) if attn[i]], dropout=0.0, resblock_updown=updown,
              num_classes=num_classes, null_label=False, norm_eps=1e-5, head_channels=flags.get("head_channels"),
              num_heads=flags.get("num_heads") or 1, scale_shift=scale_shift, resample_proj=False)
    return kw, flags["new_order"], flags["schedule"]


def unet_file_kind(path):
    """"diffusers" | "adm" for a public UNet file or folder that load_unet reads, else None (a DiT file, a run folder,
    ...). Peeks at the keys only (memory-mapped), so a multi-GB DiT file costs nothing here."""
    if not os.path.exists(path):
        return None
    if _diffusers_files(path) is not None:
        return "diffusers"
    if os.path.isdir(path):
        return None
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
        else:
            keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # not a zip checkpoint, unreadable, ...: whoever loads it says so in one line
        return None
    return "adm" if "input_blocks.0.0.weight" in keys else None


def load_unet(path, device="cpu", adm_flags=None):
    """A public pixel-space UNet -> (UNet in eval mode, fp32, on `device`; its config dict), strictly loaded.

    path: a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin; also a pipeline
    folder with unet/, or the weights file itself with config.json beside it), or a guided-diffusion (ADM) state dict
    (.pt, e.g. 64x64_diffusion.pt). The format is read off the file. Files are read weights-only.
    The config is what a ddae_probe run's config.json holds (arch "unet", "unet": the UNet kwargs, objective "ddpm",
    T, beta_range, schedule, sample_shape, image_size) plus "source" and "num_classes": the noise schedule comes with
    the file (diffusers: scheduler_config.json beside it or in ../scheduler, else DDPM's linear 1e-4..0.02 over 1000;
    ADM: ADM_RELEASES, cosine for the 64x64 model). adm_flags overrides ADM_RELEASES (see _adm_kwargs).
    Raises UserError in one line for a missing path, an unknown format, an unsupported config, or weights that do not
    fit (missing / unexpected keys, shape mismatches)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder (expected a diffusers UNet2DModel folder or a guided-diffusion "
                        f".pt file)")
    files = _diffusers_files(path)
    if files is not None:
        config_path, weights, sched = files
        kw, source = unet_kwargs_from_diffusers(load_json(config_path), config_path), "diffusers"
        schedule, sd = _diffusers_schedule(sched), strip_wrapper_prefixes(read_state_dict(weights))
    elif os.path.isdir(path):
        raise UserError(f"{path}: folder without config.json (expected a diffusers UNet2DModel folder)")
    else:
        weights, source, sd = path, "adm", strip_wrapper_prefixes(read_state_dict(path))
        if "input_blocks.0.0.weight" not in sd:
            raise UserError(f"{path}: neither a guided-diffusion UNet (no input_blocks.0.0.weight) nor a diffusers weights "
                            f"file with config.json beside it")
        kw, new_order, kind = _adm_kwargs(sd, path, adm_flags)
        schedule = dict(T=1000, beta_range=[1e-4, 0.02], schedule=kind)
    with torch.device("meta"):  # no random init: the file overwrites every parameter
        model = UNet(**kw)
    sd = _from_diffusers(sd, model) if source == "diffusers" else _from_adm(sd, model, new_order)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, weights)
    C, H = kw["in_channels"], kw["image_size"]
    cfg = dict(arch="unet", source=source, unet=model.config, objective="ddpm", **schedule, sample_shape=[C, H, H], image_size=H,
               num_classes=kw.get("num_classes", 0), data=None, vae_path=None)
    return model.float().to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------
# Diffusion: the DDPM linear schedule, DiT's eps loss, DDPM/DDIM samplers; the DDPM (VP, eps-prediction) and
# EDM (VE, preconditioned) objectives of the UNets, and the map from a noise level to the network's input


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal's cosine schedule (guided-diffusion's betas_for_alpha_bar, diffusers' squaredcos_cap_v2):
    abar(u) = cos((u + s) / (1 + s) * pi / 2)^2 and beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


class Diffusion:
    """Linear betas over T steps (schedule="cosine": cosine_betas, ADM's ImageNet 64 model);
    gamma_t = sqrt(abar_t), delta_t = sqrt(1 - abar_t).

    Linear: beta_start..beta_end are given for 1000 steps and, with scale_to_T (DiT's and improved DDPM's
    `get_named_beta_schedule("linear", T)`), multiplied by 1000 / T, so any T ends at about the same signal
    fraction (abar_T ~ 4e-5 at T = 1000, 2e-5 at T = 100); scale_to_T=False takes them as the ends of this T's
    schedule (DDAE's configs, which give beta_1 and beta_T for their own T).
    """
    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02, device="cpu", scale_to_T=True, schedule="linear"):
        self.T = T
        scale = 1000 / T if scale_to_T else 1.0
        betas = cosine_betas(T) if schedule == "cosine" else \
            torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod = abar.float().to(device)
        self.gamma, self.delta = abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)

    def q_sample(self, z0, t, eps):
        return self.gamma[t].view(-1, 1, 1, 1) * z0 + self.delta[t].view(-1, 1, 1, 1) * eps

    def predict_z0(self, z_t, t, eps_hat):
        return (z_t - self.delta[t].view(-1, 1, 1, 1) * eps_hat) / self.gamma[t].view(-1, 1, 1, 1)


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
def sample_loop(eps_fn, shape, diffusion, steps=50, method="ddim", device="cpu", generator=None, clip=None, variance="posterior"):
    """DDPM (ancestral, respaced to `steps`) or DDIM (eta = 0) from pure noise. eps_fn(x, t) -> eps. The ancestral step's
    variance: "posterior" beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (improved DDPM's fixed small), or "beta"
    sigma_t^2 = beta_t (Ho et al.'s choice on CIFAR-10, and DDAE's official DDPM.sample), with beta_t = 1 - abar_t /
    abar_prev of the (respaced) chain; the mean is the posterior mean either way."""
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
            var = beta if variance == "beta" else beta * (1 - a_prev) / (1 - a_t)
            noise = torch.randn(shape, device=device, generator=generator)
            x = mean + (var.sqrt() * noise if i + 1 < len(ts) else 0)
    return x


class DDPMObjective:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, linear betas over T steps; the network predicts eps.

    Levels are integer timesteps counted from `first_t`: level t is schedule index i = t - first_t, and index 0 is
    one step of noise (beta_1). first_t = 0 (default) is the 0-based index of Ho et al.'s and DiT's code and of
    diffusers; first_t = 1 is the t of the DDPM and DDAE papers and of DDAE's official code (its
    alphabar_t[t] = prod_{s<=t} (1 - beta_s) with beta_0 = 0, t in [1, T]), so DDAE's t = 11 is index 10.
    The network is conditioned on the index i (the time input our UNets and the public UNets were trained on)."""
    kind = "ddpm"

    def __init__(self, T=1000, beta_range=(1e-4, 0.02), device="cpu", schedule="linear", first_t=0):
        self.T, self.beta_range, self.schedule, self.first_t = T, tuple(beta_range), schedule, int(first_t)
        self.diffusion = Diffusion(T, beta_range[0], beta_range[1], device=device, scale_to_T=False, schedule=schedule)

    def loss(self, net, x0, step, seed, dist, y=None, class_dropout=0.0, null_label=0):
        g, n = step_generator(seed, step, x0.device), x0.shape[0]
        t = draw_global(g, "randint", n, dist, high=self.T)
        eps = draw_global(g, "randn", n, dist, *x0.shape[1:])
        drop = draw_global(g, "rand", n, dist) < class_dropout
        if y is not None and class_dropout > 0:
            y = torch.where(drop, torch.full_like(y, null_label), y)
        out = net(self.diffusion.q_sample(x0, t, eps).to(memory_format=mem_format(x0)), t.float(), y)
        return F.mse_loss(out[:, :x0.shape[1]].float(), eps)  # ADM's learn_sigma channels follow eps

    def net_input(self, x0, level, eps=None):
        """(network input, conditioning) for images x0 noised to `level` (N,); eps=None: no noise (fine-tuning)."""
        t = level.long() - self.first_t  # the schedule index
        x = self.diffusion.gamma[t].view(-1, 1, 1, 1) * x0
        if eps is not None:
            x = x + self.diffusion.delta[t].view(-1, 1, 1, 1) * eps
        return x, t.float()

    def random_levels(self, g, n, dist):
        return draw_global(g, "randint", n, dist, high=self.T) + self.first_t

    def check_levels(self, levels):
        lo, hi = self.first_t, self.T - 1 + self.first_t
        bad = [t for t in levels if t != int(t) or not lo <= t <= hi]
        if bad:
            raise UserError(f"--t {bad}: ddpm timesteps must be integers in [{lo}, {hi}]"
                            + (" (the paper's t, counted from 1)" if self.first_t else ""))
        return [int(t) for t in levels]

    def default_levels(self):
        """DDAE's official grid t = 1, 11, 21 (of 1000, first_t = 1; indices 0, 10, 20) and a sweep above it, scaled to T."""
        return sorted({self.first_t + min(self.T - 1, int(round(f * self.T))) for f in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)})

    @torch.no_grad()
    def sample(self, net, shape, generator, steps=None, y=None, method="ddpm", variance="beta"):
        """Ancestral DDPM (sigma_t^2 = beta_t, as Ho et al. and DDAE's DDPM.sample; variance="posterior": beta~_t) or
        DDIM, x0 clipped to [-1, 1] as the official pred_eps_."""
        eps_fn = lambda x, t: net(x, t.float(), y)[:, :shape[1]].float()  # noqa: E731
        return sample_loop(eps_fn, shape, self.diffusion, steps or self.T, method, generator.device, generator, clip=1.0,
                           variance=variance)


class EDMObjective:
    """EDM (Karras et al. 2022): x = x0 + sigma * eps, D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), trained
    with log-normal sigma (P_mean, P_std) and the loss weight (sigma^2 + sd^2) / (sigma sd)^2.

    Levels are sigma itself (floats). The network is fed c_in(sigma) * x and conditioned on c_noise = ln(sigma) / 4,
    so a probe "at t = 0.06" means sigma = 0.06. The VP equivalent of sigma is abar = 1 / (1 + sigma^2)."""
    kind = "edm"

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def precond(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def denoise(self, net, x, sigma, y=None):
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise): the denoised image. sigma: (N,)"""
        c_skip, c_out, c_in, c_noise = self.precond(sigma.float())
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        return c_skip * x + c_out * net(c_in * x, c_noise, y).float()

    def loss(self, net, x0, step, seed, dist, y=None, class_dropout=0.0, null_label=0):
        g, n = step_generator(seed, step, x0.device), x0.shape[0]
        sigma = (draw_global(g, "randn", n, dist) * self.P_std + self.P_mean).exp()
        eps = draw_global(g, "randn", n, dist, *x0.shape[1:])
        drop = draw_global(g, "rand", n, dist) < class_dropout
        if y is not None and class_dropout > 0:
            y = torch.where(drop, torch.full_like(y, null_label), y)
        weight = ((sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2).view(-1, 1, 1, 1)
        D = self.denoise(net, (x0 + sigma.view(-1, 1, 1, 1) * eps).to(memory_format=mem_format(x0)), sigma, y)
        return (weight * (D - x0) ** 2).mean()

    def net_input(self, x0, level, eps=None):
        sigma = level.float()
        _, _, c_in, c_noise = self.precond(sigma)
        x = x0 if eps is None else x0 + sigma.view(-1, 1, 1, 1) * eps
        return c_in.view(-1, 1, 1, 1) * x, c_noise

    def random_levels(self, g, n, dist):
        """Log-uniform over [sigma_min, sigma_max]: every level the sampler visits (noise-conditional classifier)."""
        u = draw_global(g, "rand", n, dist)
        return (math.log(self.sigma_min) + u * (math.log(self.sigma_max) - math.log(self.sigma_min))).exp()

    def check_levels(self, levels):
        bad = [s for s in levels if not s > 0]
        if bad:
            raise UserError(f"--t {bad}: edm levels are noise levels sigma > 0")
        return [float(s) for s in levels]

    def default_levels(self):
        """Around the paper's EDM optimum sigma ~ 0.06."""
        return [0.002, 0.01, 0.03, 0.06, 0.1, 0.2, 0.5, 1.0]

    @torch.no_grad()
    def sample(self, net, shape, generator, steps=None, y=None, method="heun"):
        """EDM's deterministic Heun sampler (Algorithm 1): `steps` (18) levels, 2 * steps - 1 evaluations."""
        steps, device = steps or 18, generator.device
        i = torch.arange(steps, dtype=torch.float64, device=device)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        s = (hi + i / (steps - 1) * (lo - hi)) ** self.rho  # EDM's time steps, sigma_max -> sigma_min
        s = torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])
        x = torch.randn(shape, generator=generator, device=device, dtype=torch.float64) * s[0]
        for k in range(steps):
            s_cur, s_next = s[k], s[k + 1]
            d = (x - self.denoise(net, x.float(), s_cur.float().expand(shape[0]), y).double()) / s_cur
            x_next = x + (s_next - s_cur) * d
            if k < steps - 1:
                d2 = (x_next - self.denoise(net, x_next.float(), s_next.float().expand(shape[0]), y).double()) / s_next
                x_next = x + (s_next - s_cur) * (0.5 * d + 0.5 * d2)
            x = x_next
        return x.float().clamp(-1, 1)


def make_objective(cfg, device="cpu", first_t=0):
    """The objective of a checkpoint config; first_t: where a ddpm level count starts (DDPMObjective)."""
    if cfg["objective"] == "edm":
        return EDMObjective(**cfg.get("edm", {}))
    return DDPMObjective(cfg.get("T", 1000), cfg.get("beta_range", (1e-4, 0.02)), device=device,
                         schedule=cfg.get("schedule", "linear"), first_t=first_t)


def mem_format(x):
    """channels_last for 4-D CUDA tensors (conv nets run faster so), else contiguous."""
    return torch.channels_last if x.is_cuda and x.dim() == 4 else torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Checkpoint folders written by the method scripts


def test_split_spec(args, cfg):
    """The test split a stage reads: --test-data if given, else the run's own test file (recorded at pre-training)
    when the stage reads the run's data, else --data."""
    if getattr(args, "test_data", None):
        return args.test_data
    if not getattr(args, "data", None) or args.data == cfg.get("data"):
        return cfg.get("test_data") or cfg.get("data")
    return args.data


def checkpoint_kind(cfg):
    """What a checkpoint folder's config.json describes: "unet" (ddae_probe.py pretrain), "dit" (repcond_dit.py
    pretrain / tune, diffusion_classifier.py train: a RepCondDiT) or None."""
    if cfg.get("arch") == "unet" and "unet" in cfg:
        return "unet"
    if cfg.get("model") in DiT_models and "sample_shape" in cfg:
        return "dit"
    return None


def build_net(cfg):
    """The network a checkpoint config describes (random weights): a UNet or a RepCondDiT."""
    return UNet(**cfg["unet"]) if checkpoint_kind(cfg) == "unet" else build_model(cfg)


KIND_SCRIPTS = {"dit": "repcond_dit", "unet": "ddae_probe"}


def load_run(ckpt, device, vae_path=None, data_spec=None, split="train", kinds=("dit", "unet"), official_dit=False,
             flag="--ckpt", image_size=None, amp="auto"):
    """A checkpoint folder -> (network with its EMA weights in eval mode, its config, data set, Space).

    The data set is the run's own (`data_spec` overrides it, with the same sample shape); the Space encodes it
    as the run did (pixels, latents file, or `vae_path` / the run's VAE). kinds: the checkpoint kinds accepted
    (checkpoint_kind); anything else is refused in one line.
    With official_dit=True, `ckpt` may also be an official DiT release file (DiT-XL-2-256x256.pt): it has no data of its
    own, so `data_spec` is required (ImageNet latents, or images with `vae_path`, at `image_size`; Space in `amp`); the
    network is RepCondDiT(the DiT), the config {T: 1000, classes: the ImageNet wnids for a 1000-class DiT, official:
    True, ...}. flag: the command-line name of `ckpt`, for the error lines."""
    if official_dit and os.path.isfile(ckpt):
        return _load_official_dit_run(ckpt, device, vae_path, data_spec, split, flag, image_size, amp)
    d = find_checkpoint(ckpt)
    cfg = load_json(os.path.join(d, "config.json"))
    if checkpoint_kind(cfg) not in kinds:
        raise UserError(f"{d}: config.json is not a {' or '.join(KIND_SCRIPTS[k] for k in kinds)} checkpoint config")
    device = torch.device(device)
    model = load_weights(d, build_net(cfg)).to(device).eval()
    if device.type == "cuda" and isinstance(model, UNet):
        model = model.to(memory_format=torch.channels_last)
    ds = data.load(data_spec or cfg["data"], split, cfg.get("image_size"),
                   flag="--data (the train split's file; the test split's goes to --test-data)" if split == "train" else "--test-data")
    space = Space(ds, vae_path or cfg.get("vae_path"), device, resolve_amp(cfg.get("amp", "auto"), device))
    if tuple(space.sample_shape) != tuple(cfg["sample_shape"]):
        raise UserError(f"--data {data_spec or cfg['data']}: samples are {tuple(space.sample_shape)}, the network takes "
                        f"{tuple(cfg['sample_shape'])}: the checkpoint {d} was trained on {tuple(cfg['sample_shape'])} "
                        f"(--image-size / --vae-path)")
    return model, cfg, ds, space


def _load_official_dit_run(path, device, vae_path, data_spec, split, flag, image_size, amp):
    if not data_spec:
        raise UserError(f"{flag} {path}: an official DiT file needs --data (ImageNet latents .safetensors, or images with "
                        "--vae-path)")
    dit = load_dit(path, device)
    shape = (dit.in_channels, dit.input_size, dit.input_size)
    ds = data.load(data_spec, split, image_size)
    space = Space(ds, vae_path, device, resolve_amp(amp, device))
    if tuple(space.sample_shape) != shape:
        raise UserError(f"--data {data_spec}: model inputs are {tuple(space.sample_shape)}, {path} takes {shape} "
                        f"(--vae-path / --image-size)")
    classes = [w for w, _ in data.imagenet_classes()] if dit.num_classes == 1000 else None
    cfg = dict(T=1000, classes=classes, data=data_spec, image_size=image_size, vae_path=vae_path, sample_shape=list(shape),
               num_classes=dit.num_classes, official=True)
    return RepCondDiT(dit).eval(), cfg, ds, space

