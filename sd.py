"""Stable Diffusion 1.x / 2.x, written by hand: the denoising UNet, the CLIP text encoders and CLIP's BPE tokenizer,
loading the public files strictly. Paper 001 (Diffusion Classifier) classifies with it zero-shot.

The UNet's attribute paths are the keys of the original LDM checkpoints (`model.diffusion_model.*`), the text
encoder's those of transformers' CLIPTextModel (`text_model.*`, which SD 1.x single files also use); the other layouts
(diffusers folders, OpenCLIP's fused attention of SD 2.x single files) are renamed on the fly. The VAE is vae.py's.

    import sd
    pipe = sd.load("stable-diffusion-2-base", device="cuda")        # a diffusers folder, or
    pipe = sd.load("v1-5-pruned-emaonly.safetensors", tokenizer="clip-vit-large-patch14/")  # a single LDM file
    ctx = pipe.encode_text(["a photo of a dog."])                     # (1, 77, 768 or 1024)
    z0 = pipe.vae.encode(x).mean * pipe.scaling_factor                # x: (N, 3, 512, 512) in [-1, 1]
    eps = pipe.eps(z_t, t, ctx)                                       # the UNet's eps (v models converted)

The official models: CompVis/ldm `openaimodel.py` + `attention.py` (UNet), OpenAI CLIP / OpenCLIP (text),
`simple_tokenizer.py` (BPE). Facts used here are listed in tests/reference/README.md.
"""
import gzip
import json
import math
import os
import re
import unicodedata
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

import vae
from data import UserError
from training import strip_wrapper_prefixes

# -----------------------------------------------------------------------------
# UNet (LDM's openaimodel.UNetModel with SpatialTransformer, as SD 1.x / 2.x use it)


def Normalize(channels, eps=1e-5):
    return nn.GroupNorm(32, channels, eps=eps)


def timestep_embedding(t, dim, max_period=10000):
    """[cos, sin] of t at dim/2 geometric frequencies (LDM's timestep_embedding; diffusers' flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-conv; a 1x1 conv skip where
    channels change. Sequential indices keep the checkpoint's key names (in_layers.2, out_layers.3)."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(Normalize(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(Normalize(c_out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)  # (N, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (x itself for self-attention); q, k, v without bias, as LDM."""

    def __init__(self, dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        N, L, _ = x.shape
        q, k, v = (p(s).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, heads, L or L_ctx, dim_head)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        h = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, dim_head), scaled by dim_head^-0.5
        return self.to_out(h.transpose(1, 2).reshape(N, L, -1))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention over the text, GEGLU feed-forward (x4), each residual."""

    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))  # (N, HW, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv in SD 1.x, Linear in SD 2.x), transformer blocks over the H*W tokens, proj_out,
    residual."""

    def __init__(self, channels, heads, depth, context_dim, use_linear):
        super().__init__()
        self.use_linear = use_linear
        self.norm = Normalize(channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim) for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, context):
        N, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (N, HW, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(N, C, H, W)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)  # (N, C, H/2, W/2)


class TimestepSequential(nn.Sequential):
    """LDM's TimestepEmbedSequential: each layer gets what it needs (the time embedding, the text)."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The SD denoiser eps_theta(x_t, t, context) (or v_theta for v-prediction models).

    channel_mult / attention / num_heads are per resolution level; SD 1.x: 8 heads everywhere, SD 2.x: channels // 64.
    """

    def __init__(self, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                 attention=(True, True, True, False), num_heads=(8, 8, 8, 8), transformer_depth=1, context_dim=768,
                 use_linear=False):
        super().__init__()
        self.config = dict(in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
                           num_res_blocks=num_res_blocks, channel_mult=tuple(channel_mult), attention=tuple(attention),
                           num_heads=tuple(num_heads), transformer_depth=transformer_depth, context_dim=context_dim,
                           use_linear=use_linear)
        mc, emb_dim = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attn(ch, level):
            return SpatialTransformer(ch, num_heads[level], transformer_depth, context_dim, use_linear)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mc * mult, emb_dim)]
                ch = mc * mult
                if attention[level]:
                    layers.append(attn(ch, level))
                self.input_blocks.append(TimestepSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepSequential(ResBlock(ch, ch, emb_dim), attn(ch, len(channel_mult) - 1),
                                               ResBlock(ch, ch, emb_dim))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * channel_mult[level], emb_dim)]
                ch = mc * channel_mult[level]
                if attention[level]:
                    layers.append(attn(ch, level))
                if level and i == num_res_blocks:
                    layers.append(vae.Upsample(ch))  # nearest x2 then a 3x3 conv, as the VAE's
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(Normalize(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, t, context):
        """x: (N, 4, h, w) noisy latents; t: (N,) or scalar timesteps in [0, T); context: (N, 77, D) text.
        -> (N, 4, h, w), the model's prediction (eps or v)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (N, 4 mc)
        context = context.to(x.dtype)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)  # (N, mc * mult, h / 2^level, w / 2^level)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)  # (N, out_channels, h, w)


# -----------------------------------------------------------------------------
# CLIP text encoder (OpenAI CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x), transformers' key names


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        N, L, _ = x.shape
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, heads, L, dim_head): token i sees 0..i
        return self.out_proj(h.transpose(1, 2).reshape(N, L, -1))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width, heads, mlp_dim, act):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)
        self.layer_norm2 = nn.LayerNorm(width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))  # (N, L, D)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """Token ids (N, L) -> (N, L, D): the output of the first `n_used` layers, then the final LayerNorm.
    SD 1.x uses every layer (n_used = layers); SD 2.x the penultimate layer of OpenCLIP's 24 (diffusers' SD 2
    folders ship the model already cut to 23 layers, so there n_used = layers)."""

    def __init__(self, vocab_size=49408, width=768, layers=12, heads=12, mlp_dim=3072, max_len=77, act="quick_gelu",
                 n_used=None):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, width=width, layers=layers, heads=heads, mlp_dim=mlp_dim,
                           max_len=max_len, act=act, n_used=n_used or layers)
        self.n_used = n_used or layers
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(vocab_size, width)
        self.text_model.embeddings.position_embedding = nn.Embedding(max_len, width)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([CLIPEncoderLayer(width, heads, mlp_dim, act) for _ in range(layers)])
        self.text_model.final_layer_norm = nn.LayerNorm(width)

    def forward(self, ids):
        tm = self.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[:ids.shape[1]]  # (N, L, D)
        for layer in tm.encoder.layers[:self.n_used]:
            x = layer(x)
        return tm.final_layer_norm(x)  # (N, L, D)


# -----------------------------------------------------------------------------
# CLIP's tokenizer: byte-level BPE over a fixed pre-tokenisation (OpenAI's simple_tokenizer.py)


@lru_cache()
def bytes_to_unicode():
    """Each of the 256 bytes -> a printable unicode character (GPT-2's table), so BPE works on strings."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _kind(ch):
    """'L' letter, 'N' number, 's' whitespace, 'o' anything else: the classes of CLIP's pre-tokenising regex."""
    if ch.isspace():
        return "s"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "o"


def pre_tokenize(text):
    """CLIP's regex `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` by hand (no `regex` module):
    runs of letters, single digits, runs of other non-space characters, the English contractions first."""
    words, i = [], 0
    while i < len(text):
        k = _kind(text[i])
        if k == "s":
            i += 1
            continue
        m = re.match(r"'(s|t|re|ve|m|ll|d)", text[i:])
        if m:
            words.append(m.group(0))
            i += len(m.group(0))
            continue
        j = i + 1
        if k != "N":  # digits stand alone; letters and others run
            while j < len(text) and _kind(text[j]) == k:  # greedy, as the regex: "''d" is "''" then "d"
                j += 1
        words.append(text[i:j])
        i = j
    return words


class Tokenizer:
    """CLIP's BPE: text -> NFC, whitespace runs to one space, lower case -> words -> UTF-8 bytes as characters ->
    merges (lowest rank first; the last character of a word carries '</w>') -> ids, framed by <|startoftext|> and
    <|endoftext|>, truncated to max_len (the end token kept) and padded with pad_id.

    vocab: {token: id} (vocab.json); merges: [(a, b)] in rank order (merges.txt). SD 1.x pads with the end token,
    SD 2.x (OpenCLIP) with 0."""

    def __init__(self, vocab, merges, pad_id=None, max_len=77):
        self.encoder = vocab
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.bos, self.eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad_id = self.eos if pad_id is None else pad_id
        self.max_len = max_len
        self.byte_char = bytes_to_unicode()
        self.cache = {}
        self.special = {}
        self.add_special("<|startoftext|>", self.bos)
        self.add_special("<|endoftext|>", self.eos)

    def add_special(self, text, id):
        """A string that maps to one id wherever it occurs in the raw text. transformers' CLIPTokenizer does this for
        its pad token too, so a diffusers SD 2 folder (pad token "!") encodes every "!" as id 0, not as "!</w>": the
        ids diffusers (and the paper's official code) fed SD 2. OpenCLIP's own tokenizer does not."""
        self.special[text] = id
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def bpe(self, word):
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == math.inf:
                break
            a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
            out, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        self.cache[word] = parts
        return parts

    def encode(self, text):
        """One string -> its BPE ids, without start/end tokens. Unknown pieces map to the end token (CLIP's unk)."""
        ids = []
        for piece in self.split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
                continue
            piece = re.sub(r"\s+", " ", unicodedata.normalize("NFC", piece)).lower()
            for word in pre_tokenize(piece):
                chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                ids += [self.encoder.get(p, self.eos) for p in self.bpe(chars)]
        return ids

    def __call__(self, texts):
        """list[str] -> LongTensor (N, max_len): [bos, ids..., eos, pad...], cut to max_len with eos kept last."""
        out = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        for n, text in enumerate(texts):
            ids = [self.bos] + self.encode(text)[:self.max_len - 2] + [self.eos]
            out[n, :len(ids)] = torch.tensor(ids)
        return out


def read_tokenizer(path, pad_id=None):
    """A Tokenizer from a folder holding vocab.json + merges.txt (a diffusers `tokenizer/` folder, or
    openai/clip-vit-large-patch14), or OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the CLIP / OpenCLIP repositories)."""
    if os.path.isfile(path) and path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # as simple_tokenizer.py: 48894 merges
        merges = [tuple(line.split()) for line in lines if line.strip()]
        base = list(bytes_to_unicode().values())
        tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        return Tokenizer({t: i for i, t in enumerate(tokens)}, merges, pad_id)
    vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.isfile(vocab_file) and os.path.isfile(merges_file)):
        raise UserError(f"{path}: expected a folder with vocab.json and merges.txt, or bpe_simple_vocab_16e6.txt.gz")
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#version")]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        if special not in vocab:
            raise UserError(f"{vocab_file}: no {special} token (not CLIP's vocabulary)")
    return Tokenizer(vocab, merges, pad_id)


# -----------------------------------------------------------------------------
# layouts: diffusers -> LDM (UNet), OpenCLIP -> transformers (SD 2.x text encoder)


def unet_diffusers_to_ldm(sd, num_res_blocks, attention):
    """Rename a diffusers UNet2DConditionModel state dict to LDM keys (diffusers' documented mapping, structural:
    down_blocks.i.resnets.j -> input_blocks.{1 + i (n+1) + j}.0, ...). Unknown keys pass through (then unexpected)."""
    n = num_res_blocks + 1
    levels = len(attention)
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(prefix, rest):
        name, _, leaf = rest.partition(".")
        return f"{prefix}.{res.get(name, name)}.{leaf}"
    out = {}
    for k, v in sd.items():
        new = k
        if (m := re.match(r"(time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(.+)$", k)):
            new = f"{top[m.group(1)]}.{m.group(2)}"
        elif (m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k)):
            new = resnet(f"input_blocks.{1 + int(m.group(1)) * n + int(m.group(2))}.0", m.group(3))
        elif (m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", k)):
            new = f"input_blocks.{1 + int(m.group(1)) * n + int(m.group(2))}.1.{m.group(3)}"
        elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", k)):
            new = f"input_blocks.{(int(m.group(1)) + 1) * n}.0.op.{m.group(2)}"
        elif (m := re.match(r"mid_block\.resnets\.([01])\.(.+)$", k)):
            new = resnet(f"middle_block.{2 * int(m.group(1))}", m.group(2))
        elif (m := re.match(r"mid_block\.attentions\.0\.(.+)$", k)):
            new = f"middle_block.1.{m.group(1)}"
        elif (m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k)):
            new = resnet(f"output_blocks.{int(m.group(1)) * n + int(m.group(2))}.0", m.group(3))
        elif (m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", k)):
            new = f"output_blocks.{int(m.group(1)) * n + int(m.group(2))}.1.{m.group(3)}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", k)):
            i = int(m.group(1))
            new = f"output_blocks.{i * n + n - 1}.{2 if attention[levels - 1 - i] else 1}.conv.{m.group(2)}"
        out[new] = v
    return out


def open_clip_to_hf(sd):
    """OpenCLIP text keys (SD 2.x single files: resblocks, fused attn.in_proj) -> transformers' CLIPTextModel keys.
    text_projection and logit_scale (CLIP's contrastive head, unused by SD) are dropped."""
    out = {}
    for k, v in sd.items():
        if k in ("text_projection", "logit_scale"):
            continue
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif (m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k)):
            p, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{p}self_attn.{name}.{kind}"] = part
            else:
                for a, b in (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")):
                    rest = rest.replace(a, b) if rest.startswith(a) else rest
                out[p + rest] = v
        else:
            out[k] = v  # unexpected: reported by the strict load
    return out


# -----------------------------------------------------------------------------
# configs from the weights' shapes


def unet_config(sd, version):
    """UNetModel kwargs from an LDM-layout state dict; heads by SD's rule for `version` ("sd1": 8 heads,
    "sd2": channels // 64) unless the caller overrides num_heads. None when the shapes cannot be read."""
    try:
        mc, cin = sd["input_blocks.0.0.weight"].shape[:2]
        ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
        downs = [i for i in ids if f"input_blocks.{i}.0.op.weight" in sd]
        nrb = (downs[0] - 1) if downs else len(ids) - 1
        levels = len(downs) + 1
        first = [1 + lv * (nrb + 1) for lv in range(levels)]
        mult = tuple(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first)
        attention = tuple(f"input_blocks.{i}.1.norm.weight" in sd for i in first)
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k)))
        context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        use_linear = sd["middle_block.1.proj_in.weight"].ndim == 2
        cout = sd["out.2.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        return None
    heads = tuple(8 if version == "sd1" else max(1, mc * m // 64) for m in mult)
    return dict(in_channels=cin, model_channels=mc, out_channels=cout, num_res_blocks=nrb, channel_mult=mult,
                attention=attention, num_heads=heads, transformer_depth=depth, context_dim=context_dim, use_linear=use_linear)


def text_config(sd, act, n_used_back=0):
    """CLIPTextModel kwargs from transformers-layout keys; heads = width // 64 (ViT-L/14 and ViT-H/14 text);
    n_used_back layers at the end are not used (1 for SD 2.x single files: the penultimate layer)."""
    try:
        vocab_size, width = sd["text_model.embeddings.token_embedding.weight"].shape
        max_len = sd["text_model.embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
        mlp_dim = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError):
        return None
    return dict(vocab_size=vocab_size, width=width, layers=layers, heads=max(1, width // 64), mlp_dim=mlp_dim,
                max_len=max_len, act=act, n_used=layers - n_used_back)


def strict_load(model, sd, what, dtype):
    """load_state_dict(strict=True) with one line listing missing / unexpected keys and shape mismatches."""
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs model {tuple(want[k])}" for k in want if k in sd and sd[k].shape != want[k]]
    if missing or unexpected or mismatched:
        parts = [f"{name}: {vae._short(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
        raise UserError(f"{what}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model


def build(cls, config, sd, what, dtype):
    if config is None:
        raise UserError(f"{what}: the weights do not read as a Stable Diffusion {cls.__name__} (key names or shapes)")
    with torch.device("meta"):  # no random init that the weights overwrite
        model = cls(**config)
    return strict_load(model, sd, f"{what} (config {config})", dtype)


# -----------------------------------------------------------------------------
# the pipeline object and the two layouts


def scaled_linear_alphas_cumprod(T=1000, beta_start=0.00085, beta_end=0.012):
    """SD's "scaled linear" betas: linspace of sqrt(beta) from sqrt(0.00085) to sqrt(0.012), squared -> abar (T,)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class StableDiffusion(nn.Module):
    """What the Diffusion Classifier needs of a Stable Diffusion model: unet, vae, text_encoder, tokenize,
    encode_text, prediction_type, alphas_cumprod (T,) float32, scaling_factor, version ("sd1" | "sd2")."""

    def __init__(self, unet, text_encoder, vae_model, tokenizer, alphas_cumprod, prediction_type, version, source):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae_model
        self.tokenizer = tokenizer
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.prediction_type, self.version, self.source = prediction_type, version, source
        self.scaling_factor = vae_model.scaling_factor

    def tokenize(self, texts):
        """list[str] -> LongTensor (N, 77) on the CPU."""
        if self.tokenizer is None:
            raise UserError(f"{self.source}: no tokenizer found beside this single file; pass --tokenizer with a folder "
                            "holding CLIP's vocab.json and merges.txt (e.g. a diffusers SD folder's tokenizer/) or "
                            "bpe_simple_vocab_16e6.txt.gz")
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, texts, batch_size=64):
        """list[str] -> (N, 77, D) text embeddings (D = 768 for SD 1.x, 1024 for SD 2.x), the UNet's context."""
        ids = self.tokenize(texts).to(self.alphas_cumprod.device)
        return torch.cat([self.text_encoder(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])

    def eps(self, x_t, t, context):
        """The UNet's noise prediction at (x_t, t) for text embeddings context (N, 77, D); a v-prediction model's
        output is converted: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
        out = self.unet(x_t, t, context)  # (N, 4, h, w)
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1 - abar).sqrt() * x_t.to(out.dtype)
        return out


LDM_BUFFERS = re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|"
                         r"logvar|lvlb_weights|model_ema\..*|loss\..*)$")  # LDM's schedule buffers, EMA copies, loss terms


def _check_prediction_type(p, flag_hint):
    if p not in ("epsilon", "v_prediction"):
        raise UserError(f"{flag_hint}: prediction type {p!r}, expected epsilon or v_prediction")
    return p


def load_single_file(path, device=None, dtype=None, tokenizer=None, prediction_type=None):
    """An LDM single file (.safetensors or a weights-only .ckpt): model.diffusion_model.* (UNet),
    cond_stage_model.transformer.* (SD 1.x) or cond_stage_model.model.* (SD 2.x), first_stage_model.* (VAE)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (expected a Stable Diffusion .safetensors or .ckpt, or a diffusers folder)")
    raw = strip_wrapper_prefixes(vae.read_state_dict(path))
    parts = {"unet": {}, "sd1": {}, "sd2": {}, "vae": {}}
    prefixes = (("model.diffusion_model.", "unet"), ("cond_stage_model.transformer.", "sd1"),
                ("cond_stage_model.model.", "sd2"), ("first_stage_model.", "vae"))
    unknown = []
    for k, v in raw.items():
        for p, part in prefixes:
            if k.startswith(p):
                parts[part][k[len(p):]] = v
                break
        else:
            if not LDM_BUFFERS.match(k):
                unknown.append(k)
    if not parts["unet"] or not (parts["sd1"] or parts["sd2"]):
        raise UserError(f"{path}: not a Stable Diffusion 1.x/2.x single file (no model.diffusion_model.* with "
                        "cond_stage_model.transformer.* or cond_stage_model.model.* keys)")
    if unknown:
        raise UserError(f"{path}: unexpected keys outside the UNet, text encoder and VAE: {vae._short(unknown)}")
    version = "sd1" if parts["sd1"] else "sd2"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    if version == "sd1":
        text_sd = {k: v for k, v in parts["sd1"].items() if not k.endswith("position_ids")}  # a buffer older files saved
        text_cfg = text_config(text_sd, "quick_gelu")
    else:
        text_sd = open_clip_to_hf(parts["sd2"])
        text_cfg = text_config(text_sd, "gelu", n_used_back=1)  # SD 2.x: the penultimate layer
        if prediction_type is None:
            raise UserError(f"{path}: an SD 2.x single file does not say whether it predicts eps (512-px base models) or "
                            "v (768-px models); pass --prediction-type epsilon or v_prediction")
    unet = build(UNetModel, unet_config(parts["unet"], version), parts["unet"], f"{path} (UNet, model.diffusion_model.*)", dtype)
    text = build(CLIPTextModel, text_cfg, text_sd, f"{path} (text encoder, cond_stage_model.*)", dtype)
    vae_model = vae.from_state_dict(raw, path)  # first_stage_model.*, through vae.py's loader
    abar = raw["alphas_cumprod"].double() if "alphas_cumprod" in raw else scaled_linear_alphas_cumprod()
    tok = _find_tokenizer(tokenizer, [os.path.dirname(os.path.abspath(path))], version)
    pred = _check_prediction_type(prediction_type or "epsilon", "--prediction-type")
    return StableDiffusion(unet, text, vae_model, tok, abar, pred, version, path).to(device or "cpu").eval()


def _find_tokenizer(given, folders, version):
    pad_id = 0 if version == "sd2" else None  # OpenCLIP pads with 0 ("!"), OpenAI CLIP with the end token
    if given:
        return read_tokenizer(given, pad_id)
    for d in folders:
        for cand in (d, os.path.join(d, "tokenizer")):
            if os.path.isfile(os.path.join(cand, "vocab.json")) and os.path.isfile(os.path.join(cand, "merges.txt")):
                return read_tokenizer(cand, pad_id)
        if os.path.isfile(os.path.join(d, "bpe_simple_vocab_16e6.txt.gz")):
            return read_tokenizer(os.path.join(d, "bpe_simple_vocab_16e6.txt.gz"), pad_id)
    return None


def _weights(folder, names):
    for n in names:
        f = os.path.join(folder, n)
        if os.path.isfile(f):
            return f
    raise UserError(f"{folder}: no weights file (expected one of {', '.join(names)})")


def _json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({vae._one_line(e)})") from None


def load_diffusers_unet(folder, dtype=torch.float32):
    """A diffusers `unet/` folder (config.json + weights) -> (UNetModel, "sd1" | "sd2"), renamed to LDM keys and loaded
    strictly. diffusers' `attention_head_dim` is the number of heads (its documented misnomer)."""
    ucfg = _json(os.path.join(folder, "config.json"))
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if ucfg.get(key):
            raise UserError(f"{folder}/config.json: {key}={ucfg[key]!r} is not Stable Diffusion 1.x/2.x (SDXL and "
                            "other UNets are not supported)")
    ufile = _weights(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                              "diffusion_pytorch_model.bin"))
    usd = vae.read_state_dict(ufile)
    attention = tuple(t.startswith("CrossAttn") for t in ucfg.get("down_block_types", []))
    nrb = ucfg.get("layers_per_block", 2)
    usd = unet_diffusers_to_ldm(usd, nrb, attention)
    version = "sd1" if ucfg.get("cross_attention_dim", 768) == 768 else "sd2"
    config = unet_config(usd, version)
    if config is not None:
        heads = ucfg.get("num_attention_heads") or ucfg.get("attention_head_dim", 8)
        heads = heads if isinstance(heads, list) else [heads] * len(config["channel_mult"])
        config["num_heads"] = tuple(heads)
    unet = build(UNetModel, config, usd, f"{ufile} (UNet)", dtype)
    return unet, version


def load_diffusers(path, device=None, dtype=None, tokenizer=None, prediction_type=None):
    """A diffusers pipeline folder: unet/, text_encoder/, tokenizer/, vae/, scheduler/scheduler_config.json."""
    for sub in ("unet", "text_encoder", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise UserError(f"{path}: no {sub}/ folder (expected a diffusers Stable Diffusion pipeline folder)")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    unet, version = load_diffusers_unet(os.path.join(path, "unet"), dtype)
    tcfg = _json(os.path.join(path, "text_encoder", "config.json"))
    tfile = _weights(os.path.join(path, "text_encoder"), ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"))
    tsd = {k: v for k, v in vae.read_state_dict(tfile).items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in tsd):  # transformers 5 saves CLIPTextModel without the prefix
        tsd = {"text_model." + k: v for k, v in tsd.items()}
    text_cfg = text_config(tsd, tcfg.get("hidden_act", "quick_gelu"))
    if text_cfg is not None:
        text_cfg["heads"] = tcfg.get("num_attention_heads", text_cfg["heads"])
    text = build(CLIPTextModel, text_cfg, tsd, f"{tfile} (text encoder)", dtype)
    vae_model = vae.load(os.path.join(path, "vae"))
    scfg = _json(os.path.join(path, "scheduler", "scheduler_config.json"))
    schedule = scfg.get("beta_schedule", "scaled_linear")
    T, b0, b1 = scfg.get("num_train_timesteps", 1000), scfg.get("beta_start", 0.00085), scfg.get("beta_end", 0.012)
    if schedule == "scaled_linear":
        abar = scaled_linear_alphas_cumprod(T, b0, b1)
    elif schedule == "linear":
        abar = torch.cumprod(1 - torch.linspace(b0, b1, T, dtype=torch.float64), 0)
    else:
        raise UserError(f"{path}/scheduler/scheduler_config.json: beta_schedule {schedule!r} (expected scaled_linear or linear)")
    pred = _check_prediction_type(prediction_type or scfg.get("prediction_type", "epsilon"),
                                  f"{path}/scheduler/scheduler_config.json")
    tok = None
    tok_dir = tokenizer or os.path.join(path, "tokenizer")
    if os.path.exists(tok_dir):
        tok = read_tokenizer(tok_dir, 0 if version == "sd2" else None)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the pad token the pipeline was built with
            f = os.path.join(tok_dir, name)
            pad = _json(f).get("pad_token") if os.path.isfile(f) else None
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad in tok.encoder:
                tok.pad_id = tok.encoder[pad]
                tok.add_special(pad, tok.pad_id)  # as transformers' CLIPTokenizer, which diffusers uses
                break
    return StableDiffusion(unet, text, vae_model, tok, abar, pred, version, path).to(device or "cpu").eval()


def load(path, device=None, dtype=None, tokenizer=None, prediction_type=None):
    """A Stable Diffusion 1.x / 2.x model from a diffusers pipeline folder or an LDM single file (.safetensors or
    weights-only .ckpt) -> StableDiffusion. dtype (default float32) applies to the UNet and the text encoder; the VAE
    stays float32 (SD VAEs overflow in float16). tokenizer: a vocab.json + merges.txt folder or
    bpe_simple_vocab_16e6.txt.gz (default: the pipeline's tokenizer/, or one beside a single file).
    prediction_type overrides the file's ("epsilon" | "v_prediction"). Raises UserError in one line on bad input."""
    path = str(path)
    if os.path.isdir(path):
        return load_diffusers(path, device, dtype, tokenizer, prediction_type)
    return load_single_file(path, device, dtype, tokenizer, prediction_type)
