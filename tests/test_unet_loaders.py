"""Public pixel-space UNets (models.load_unet): diffusers UNet2DModel folders against diffusers itself (the configs of
google/ddpm-cifar10-32 and google/ddpm-ema-celebahq-256, safetensors and .bin, current and pre-2023 attention names),
guided-diffusion (ADM) files against the official definition (key list of 64x64_diffusion.pt, a forward written from
guided_diffusion/unet.py, both attention orders, the cosine schedule), official layer names, clear refusals, and one
random-weight file of each format through `ddae_probe.py probe --unet-path` and `repfusion.py distill --teacher`."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cli
import ddae_probe as dp
import models
import repfusion as rf
from data import UserError

diffusers = pytest.importorskip("diffusers")  # the reference (test-only; the scripts never import it)

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread for these tiny tensors


def randomize(named_params, seed):
    """Weights that make every path matter: fan-in scaled matrices, norms around 1, non-zero biases (the
    releases' zero-initialised convs would hide half the network)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in named_params:
        if p.dim() > 1:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        elif "norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")):
            v = 1 + 0.2 * torch.randn(p.shape, generator=g)
        else:
            v = 0.2 * torch.randn(p.shape, generator=g)
        out[name] = v
    return out


# ---------------------------------------------------------------------------------------------- diffusers

# the hub configs (reference README): DDPM's tf layout as diffusers ported it
DDPM = dict(layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
            attention_head_dim=None, act_fn="silu", center_input_sample=False, time_embedding_type="positional",
            mid_block_scale_factor=1, in_channels=3, out_channels=3)
CIFAR10 = dict(DDPM, sample_size=32, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
CELEBAHQ = dict(DDPM, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
OLD_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}  # files before mid-2023


def diffusers_folder(folder, config, fmt="safetensors", old_names=False, seed=0):
    """diffusers' UNet2DModel with random weights, saved by save_pretrained (config.json + weights) -> the model."""
    ref = diffusers.UNet2DModel(**config).eval()
    ref.load_state_dict(randomize(ref.named_parameters(), seed))
    ref.save_pretrained(folder, safe_serialization=fmt == "safetensors")
    if old_names:
        path = os.path.join(folder, "diffusion_pytorch_model.bin")
        sd = torch.load(path, weights_only=True)
        for new, old in OLD_NAMES.items():
            sd = {k.replace(new, old): v for k, v in sd.items()}
        assert any(".query." in k for k in sd)
        torch.save(sd, path)
    return ref


def max_diff(ref, net, size, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.tensor([0, 437, 999][:batch])
    with torch.no_grad():
        a, b = ref(x, t).sample, net(x, t.float())
    return (a - b).abs().max().item(), a.abs().max().item()


def shrink(config, widths):
    return dict(config, block_out_channels=widths)


@pytest.mark.parametrize("name,config,fmt,old,size", [
    ("cifar10", shrink(CIFAR10, [32, 64, 64, 64]), "safetensors", False, 32),
    ("cifar10-heads", dict(shrink(CIFAR10, [32, 64, 64, 64]), attention_head_dim=16), "bin", False, 32),
    ("celebahq", shrink(CELEBAHQ, [32, 32, 64, 64, 128, 128]), "bin", True, 64),
])
def test_diffusers_unet2dmodel_parity(tmp_path, name, config, fmt, old, size):
    """Same random weights, same function: max abs diff <= 1e-4 in fp32 on the CPU (the hub configs with narrower
    widths; every structural feature kept: DDPM's [sin, cos] time embedding with freq_shift 1, GroupNorm(32, 1e-6),
    asymmetric downsample padding, attention levels, one head or several)."""
    ref = diffusers_folder(tmp_path, config, fmt, old)
    net, cfg = models.load_unet(str(tmp_path))
    diff, scale = max_diff(ref, net, size)
    assert diff <= 1e-4 and scale > 0.1, (diff, scale)
    assert cfg["source"] == "diffusers" and cfg["schedule"] == "linear" and cfg["beta_range"] == [1e-4, 0.02] and cfg["T"] == 1000
    assert cfg["sample_shape"] == [3, config["sample_size"], config["sample_size"]]


def test_the_exact_cifar10_config_from_its_weights_file(tmp_path):
    """google/ddpm-cifar10-32 at its real widths (35.7M, the parameter count of Ho et al.'s CIFAR-10 model), loaded
    from the weights file path with config.json beside it."""
    ref = diffusers_folder(tmp_path, CIFAR10)
    net, _ = models.load_unet(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    diff, scale = max_diff(ref, net, 16, batch=1)  # 16 px: the same network at a quarter of the cost
    assert diff <= 1e-4 and scale > 0.1, (diff, scale)


def test_the_schedule_comes_with_the_folder(tmp_path):
    diffusers_folder(tmp_path, shrink(CIFAR10, [32, 32, 32, 32]))
    diffusers.DDPMScheduler(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03).save_config(str(tmp_path))
    _, cfg = models.load_unet(str(tmp_path))
    assert cfg["T"] == 500 and cfg["beta_range"] == [2e-4, 0.03]
    obj = models.make_objective(cfg)
    ref = diffusers.DDPMScheduler.from_pretrained(str(tmp_path)).alphas_cumprod
    assert obj.T == 500 and torch.allclose(obj.diffusion.alphas_cumprod, ref, rtol=1e-5)
    pipe = tmp_path / "pipeline"  # a pipeline folder: unet/ and scheduler/ side by side
    diffusers_folder(pipe / "unet", shrink(CIFAR10, [32, 32, 32, 32]))
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_config(str(pipe / "scheduler"))
    _, cfg = models.load_unet(str(pipe))
    assert cfg["schedule"] == "cosine" and models.unet_file_kind(str(pipe)) == "diffusers"
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_config(str(tmp_path))
    with pytest.raises(UserError, match="prediction_type 'v_prediction'"):
        models.load_unet(str(tmp_path))


@pytest.mark.parametrize("official,ours", [("mid_block.resnets.1.conv2", "mid.block2.conv2"), ("mid_block", "mid"),
                                           ("down_blocks.1.attentions.0", "down.3.attn"), ("down_blocks.2.downsamplers.0", "down.8"),
                                           ("up_blocks.2.resnets.0", "up.8.res_out"), ("up_blocks.3.resnets.1", "up.13"), ("up_blocks.2.attentions.2.to_out.0", "up.10.attn.proj_out"),
                                           ("up_blocks.0.upsamplers.0.conv", "up.3.conv"), ("up_blocks.1.resnets.2.time_emb_proj", "up.6.emb")])
def test_diffusers_module_paths_name_the_same_activations(tmp_path, official, ours):
    """A diffusers module path is accepted as a layer name and hooks the tensor diffusers computes there."""
    ref = diffusers_folder(tmp_path, shrink(CIFAR10, [32, 32, 32, 32]))
    net, _ = models.load_unet(str(tmp_path))
    assert net.resolve_layer(official) == ours
    got = {}
    ref.get_submodule(official).register_forward_hook(lambda m, i, o: got.__setitem__("ref", o))
    net.get_submodule(ours).register_forward_hook(lambda m, i, o: got.__setitem__("ours", o))
    max_diff(ref, net, 32)
    a, b = got["ref"], got["ours"]
    if a.dim() == 3:  # diffusers' attention projections run on (N, HW, C) tokens, ours are 1x1 convs
        a = a.transpose(1, 2).reshape(b.shape)
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("change,match", [
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift 'scale_shift' is not supported"),
    (dict(down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]), "block type ResnetDownsampleBlock2D"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]), "attention at down levels"),
    (dict(time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    (dict(class_embed_type="timestep"), "class_embed_type 'timestep'"),
])
def test_unsupported_diffusers_configs_are_refused_in_one_line(tmp_path, change, match):
    diffusers_folder(tmp_path, shrink(CIFAR10, [32, 32, 32, 32]))
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump(dict(cfg, **change), open(tmp_path / "config.json", "w"))
    with pytest.raises(UserError, match=match) as e:
        models.load_unet(str(tmp_path))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_weights_that_do_not_fit_are_listed(tmp_path):
    diffusers_folder(tmp_path, shrink(CIFAR10, [32, 32, 32, 32]), fmt="bin")
    path = tmp_path / "diffusion_pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    sd.pop("mid_block.resnets.1.conv2.weight")
    sd["conv_in.weight"] = sd["conv_in.weight"][:16]
    torch.save(sd, path)
    with pytest.raises(UserError, match=r"missing \[mid.block2.conv2.weight\].*shape mismatches \[stem.weight"):
        models.load_unet(str(tmp_path))
    with pytest.raises(UserError, match="no such file or folder"):
        models.load_unet(str(tmp_path / "nothing"))
    os.remove(tmp_path / "config.json")
    with pytest.raises(UserError, match="folder without config.json"):
        models.load_unet(str(tmp_path))


# ---------------------------------------------------------------------------------------------- guided-diffusion (ADM)

def adm_layout(ch, mult, L, attn_ds, in_ch=3, num_classes=0, learn_sigma=True, updown=True, scale_shift=True):
    """guided-diffusion's UNetModel (guided_diffusion/unet.py) parameter names and shapes, built in the order of its
    __init__, and the list of sub-modules each input / output block applies: (shapes, layout)."""
    shapes, emb, layout = {}, 4 * ch, {"in": [], "out": []}

    def param(p, *shape, bias=True):
        shapes[p + ".weight"] = list(shape)
        if bias:
            shapes[p + ".bias"] = [shape[0]]

    def res(p, i, o):
        param(p + ".in_layers.0", i)
        param(p + ".in_layers.2", o, i, 3, 3)
        param(p + ".emb_layers.1", 2 * o if scale_shift else o, emb)
        param(p + ".out_layers.0", o)
        param(p + ".out_layers.3", o, o, 3, 3)
        if i != o:
            param(p + ".skip_connection", o, i, 1, 1)

    def attn(p, c):
        param(p + ".norm", c)
        param(p + ".qkv", 3 * c, c, 1)
        param(p + ".proj_out", c, c, 1)

    param("time_embed.0", emb, ch)
    param("time_embed.2", emb, emb)
    if num_classes:
        param("label_emb", num_classes, emb, bias=False)
    param("input_blocks.0.0", ch, in_ch, 3, 3)
    chans, cur, ds, k = [ch], ch, 1, 1
    for level, m in enumerate(mult):
        for _ in range(L):
            res(f"input_blocks.{k}.0", cur, m * ch)
            cur, mods = m * ch, [("res", f"input_blocks.{k}.0", None)]
            if ds in attn_ds:
                attn(f"input_blocks.{k}.1", cur)
                mods.append(("attn", f"input_blocks.{k}.1", None))
            layout["in"].append(mods)
            chans.append(cur)
            k += 1
        if level != len(mult) - 1:
            if updown:
                res(f"input_blocks.{k}.0", cur, cur)
                layout["in"].append([("res", f"input_blocks.{k}.0", "down")])
            else:
                param(f"input_blocks.{k}.0.op", cur, cur, 3, 3)
                layout["in"].append([("down", f"input_blocks.{k}.0.op", None)])
            chans.append(cur)
            k, ds = k + 1, ds * 2
    res("middle_block.0", cur, cur)
    attn("middle_block.1", cur)
    res("middle_block.2", cur, cur)
    k = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(L + 1):
            p = f"output_blocks.{k}"
            res(p + ".0", cur + chans.pop(), m * ch)
            cur, mods = m * ch, [("res", p + ".0", None)]
            if ds in attn_ds:
                attn(p + ".1", cur)
                mods.append(("attn", p + ".1", None))
            if level and i == L:
                s = f"{p}.{len(mods)}"
                if updown:
                    res(s, cur, cur)
                    mods.append(("res", s, "up"))
                else:
                    param(s + ".conv", cur, cur, 3, 3)
                    mods.append(("up", s + ".conv", None))
                ds //= 2
            layout["out"].append(mods)
            k += 1
    param("out.0", cur)
    param("out.2", in_ch * (2 if learn_sigma else 1), cur, 3, 3)
    return shapes, layout


def adm_forward(sd, layout, x, t, y, head_channels, new_order):
    """guided_diffusion/unet.py UNetModel.forward, written from the official definition over its state dict: GroupNorm32
    (eps 1e-5, float32), ResBlock with optional up/down inside and scale-shift norm, AttentionBlock with QKVAttention
    (new order: split q/k/v, then heads) or QKVAttentionLegacy (heads, then q/k/v), scale ch^-1/4 on q and k."""
    def gn(h, p):
        return F.group_norm(h.float(), 32, sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def conv(h, p, **kw):
        return F.conv2d(h, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def res(h, p, resample):
        skip = h
        h = F.silu(gn(h, p + ".in_layers.0"))
        if resample == "down":
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        elif resample == "up":
            h, skip = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(skip, scale_factor=2, mode="nearest")
        h = conv(h, p + ".in_layers.2", padding=1)
        e = F.linear(F.silu(emb), sd[p + ".emb_layers.1.weight"], sd[p + ".emb_layers.1.bias"])[:, :, None, None]
        if e.shape[1] == 2 * h.shape[1]:
            scale, shift = e.chunk(2, dim=1)
            h = gn(h, p + ".out_layers.0") * (1 + scale) + shift
        else:
            h = gn(h + e, p + ".out_layers.0")
        h = conv(F.silu(h), p + ".out_layers.3", padding=1)
        return (conv(skip, p + ".skip_connection") if p + ".skip_connection.weight" in sd else skip) + h

    def attn(h, p):
        b, c, H, W = h.shape
        x = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(x, p + ".norm"), sd[p + ".qkv.weight"], sd[p + ".qkv.bias"])
        n, d, T = c // head_channels, head_channels, x.shape[-1]
        if new_order:
            q, k, v = (z.reshape(b * n, d, T) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * n, 3 * d, T).split(d, dim=1)
        s = 1 / math.sqrt(math.sqrt(d))
        w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, T)
        return (x + F.conv1d(a, sd[p + ".proj_out.weight"], sd[p + ".proj_out.bias"])).reshape(b, c, H, W)

    def apply(h, mods):
        for kind, p, resample in mods:
            if kind == "res":
                h = res(h, p, resample)
            elif kind == "attn":
                h = attn(h, p)
            elif kind == "down":
                h = conv(h, p, stride=2, padding=1)
            else:
                h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), p, padding=1)
        return h

    ch = sd["input_blocks.0.0.weight"].shape[0]
    freqs = torch.exp(-math.log(10000) * torch.arange(ch // 2, dtype=torch.float32) / (ch // 2))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # ADM: [cos, sin]
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]
    h = conv(x, "input_blocks.0.0", padding=1)
    hs = [h]
    for mods in layout["in"]:
        h = apply(h, mods)
        hs.append(h)
    h = res(attn(res(h, "middle_block.0", None), "middle_block.1"), "middle_block.2", None)
    for mods in layout["out"]:
        h = apply(torch.cat([h, hs.pop()], dim=1), mods)
    return conv(F.silu(gn(h, "out.0")), "out.2", padding=1)


# the published 64x64_diffusion.pt flags (reference README)
ADM64 = dict(ch=192, mult=(1, 2, 3, 4), L=3, attn_ds=(2, 4, 8), num_classes=1000)


def test_the_official_structure_gives_the_64x64_release_key_list_exactly():
    """The generator above, run with the published flags, lists exactly the keys and shapes of 64x64_diffusion.pt."""
    shapes, _ = adm_layout(**ADM64)
    ref = json.load(open(os.path.join(HERE, "reference", "adm_64x64_keys.json")))
    assert shapes == ref


def test_the_64x64_release_loads_strictly_with_its_flags():
    """Every key and shape of 64x64_diffusion.pt fits UNet as load_unet builds it (meta tensors: 296M parameters cost
    nothing), with the release's flags: 64-channel heads, new attention order, cosine schedule, 1000 classes."""
    ref = json.load(open(os.path.join(HERE, "reference", "adm_64x64_keys.json")))
    sd = {k: torch.empty(v, device="meta") for k, v in ref.items()}
    kw, new_order, schedule = models._adm_kwargs(sd, "64x64_diffusion.pt")
    assert (new_order, schedule) == (True, "cosine")
    assert kw["image_size"] == 64 and kw["attn_res"] == [32, 16, 8] and kw["num_classes"] == 1000 and not kw["null_label"]
    assert kw["out_channels"] == 6 and kw["head_channels"] == 64 and kw["resblock_updown"] and kw["scale_shift"]
    with torch.device("meta"):
        net = models.UNet(**kw)
    models.load_state_dict_strict(net, models._from_adm(sd, net, new_order), "64x64_diffusion.pt")
    assert sum(p.numel() for p in net.parameters()) == 295_904_454
    assert [net.get_submodule(n).attn.heads for n in ("down.4", "down.8", "down.12", "mid.block1")] == [384 // 64, 576 // 64, 768 // 64, 12]


def adm_file(path, seed=0, **flags):
    """A guided-diffusion state dict of random weights in the official layout, saved as the releases are (torch.save)."""
    shapes, layout = adm_layout(**flags)
    sd = randomize(((k, torch.empty(v)) for k, v in shapes.items()), seed)
    torch.save(sd, path)
    return sd, layout


SMALL_ADM = dict(ch=32, mult=(1, 2, 3, 4), L=2, attn_ds=(2, 4, 8), num_classes=10)  # 64x64_diffusion.pt, narrower


@pytest.mark.parametrize("updown,scale_shift,new_order", [(True, True, True), (True, True, False), (False, False, True)])
def test_adm_forward_follows_the_official_definition(tmp_path, updown, scale_shift, new_order):
    """The release's structure at width 32 (heads of 16 channels: 2 to 8 heads per block, so the order of the qkv
    split matters), loaded from a .pt state dict, equals the official forward in both attention orders, with and
    without scale-shift norm and resblock up/down: max abs diff <= 1e-4."""
    sd, layout = adm_file(tmp_path / "adm.pt", updown=updown, scale_shift=scale_shift, **SMALL_ADM)
    net, cfg = models.load_unet(str(tmp_path / "adm.pt"), adm_flags=dict(head_channels=16, new_order=new_order, schedule="cosine"))
    assert cfg["source"] == "adm" and cfg["num_classes"] == 10 and cfg["schedule"] == "cosine"
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([3.0, 810.0]), torch.tensor([7, 2])
    with torch.no_grad():
        ref, ours = adm_forward(sd, layout, x, t, y, 16, new_order), net(x, t, y)
        other = adm_forward(sd, layout, x, t, y, 16, not new_order)
    assert ours.shape == (2, 6, 32, 32)  # learn_sigma: eps, then the variance interpolant
    diff = (ref - ours).abs().max().item()
    assert diff <= 1e-4 and ref.abs().max() > 0.1, diff
    assert (other - ours).abs().max() > 100 * max(diff, 1e-6)  # the attention order is not a detail


def test_cosine_schedule_alphas_cumprod():
    """Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, s = 0.008, betas
    clipped at 0.999; our t is 0-based (t = 0 is one step of noise: abar = f(1) / f(0))."""
    d = models.Diffusion(1000, schedule="cosine")

    def f(u):
        return math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 250, 500, 900, 998):
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-9)
    # the same at 30 digits (mpmath): abar at t = 0 and 499; the last beta is clipped at 0.999
    assert d.alphas_cumprod[0].item() == pytest.approx(0.999958715775178, rel=1e-7)
    assert d.alphas_cumprod[499].item() == pytest.approx(0.493843590440638, rel=1e-6)
    assert d.alphas_cumprod[999].item() == pytest.approx(d.alphas_cumprod[998].item() * (1 - 0.999), rel=1e-5)
    ref = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.allclose(d.alphas_cumprod, ref, rtol=1e-4, atol=1e-7)


def test_adm_module_paths_and_ddae_out_k_resolve():
    shapes, _ = adm_layout(**SMALL_ADM)
    with torch.device("meta"):
        sd = {k: torch.empty(v) for k, v in shapes.items()}
        kw, _, _ = models._adm_kwargs(sd, "x.pt", dict(head_channels=16, new_order=True, schedule="cosine", image_size=64))
        net = models.UNet(**kw)
    # RepFusion's Tiny-ImageNet feature: the residual branch of the mid block's second res block
    assert net.resolve_layer("middle_block.2.out_layers.3") == "mid.block2.conv2"
    assert net.resolve_layer("input_blocks.4.0") == "down.3.res_out" and net.resolve_layer("input_blocks.4") == "down.3"
    assert net.resolve_layer("input_blocks.3") == "down.2" and net.resolve_layer("input_blocks.4.1.qkv") == "down.3.attn.qkv"
    assert net.resolve_layer("output_blocks.2") == "up.3"  # block 2 of the coarsest level ends with the upsampler
    assert net.resolve_layer("output_blocks.2.0.emb_layers.1") == "up.2.emb" and net.resolve_layer("output_blocks.2.2") == "up.3"
    assert net.resolve_layer("output_blocks.3.1.proj_out") == "up.4.attn.proj_out"
    assert [net.resolve_layer(f"out_{k}") for k in (1, 3, 4, 7)] == ["up.0", "up.2", "up.4", "up.8"]
    # DDAE's numbering on our presets: DDPM's best out_6 and DDPM++'s best out_7 (FutureXiang/ddae configs)
    with torch.device("meta"):
        ddpm, ddpmpp = models.UNet(**cli.UNet_models["ddpm"]), models.UNet(**cli.UNet_models["ddpmpp"])
    assert ddpm.resolve_layer("out_6") == "up.6" and ddpmpp.resolve_layer("out_7") == "up.7"
    up16 = [n for n, _, r in ddpmpp.layers if r == 16 and getattr(ddpmpp.get_submodule(n), "cat_skip", False)]
    assert up16[:2] == ["up.6", "up.7"]  # out_7: DDPM++'s second 16x16 decoder res block (up.5 is the upsampling block)
    with pytest.raises(UserError, match="--layers out_99: not a layer of this UNet"):
        ddpm.resolve_layer("out_99")


def test_unknown_adm_releases_and_other_files_are_refused(tmp_path):
    adm_file(tmp_path / "adm.pt", **SMALL_ADM)
    with pytest.raises(UserError, match="not a known release.*cannot be read off the weights"):
        models.load_unet(str(tmp_path / "adm.pt"))
    torch.save({"pos_embed": torch.zeros(1, 4, 8)}, tmp_path / "dit.pt")
    with pytest.raises(UserError, match="neither a guided-diffusion UNet"):
        models.load_unet(str(tmp_path / "dit.pt"))
    assert models.unet_file_kind(str(tmp_path / "adm.pt")) == "adm" and models.unet_file_kind(str(tmp_path / "dit.pt")) is None


# ---------------------------------------------------------------------------------------------- the scripts

TINY_DIFFUSERS = dict(DDPM, sample_size=16, block_out_channels=[32, 32], layers_per_block=1,
                      down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
TINY_ADM = dict(ch=32, mult=(1, 2), L=1, attn_ds=(2,), num_classes=10)


@pytest.fixture
def public_unets(tmp_path, monkeypatch):
    """One random-weight file per format at 16 px: a diffusers folder and a guided-diffusion .pt, the latter registered
    as a release (its flags: 16-channel heads, new order, cosine)."""
    diffusers_folder(tmp_path / "diffusers", TINY_DIFFUSERS)
    adm_file(tmp_path / "adm.pt", **TINY_ADM)
    monkeypatch.setitem(models.ADM_SIZES, 2, 16)
    monkeypatch.setitem(models.ADM_RELEASES, (16, 32, True), dict(head_channels=16, new_order=True, schedule="cosine"))
    return {"diffusers": str(tmp_path / "diffusers"), "adm": str(tmp_path / "adm.pt")}


@pytest.mark.parametrize("fmt,layers,ours", [("diffusers", ["out_1", "mid_block", "down_blocks.0.resnets.0"], ["down.0", "mid", "up.0"]),
                                             ("adm", ["middle_block", "output_blocks.1", "input_blocks.1"], ["down.0", "mid", "up.2"])])
def test_ddae_probe_reads_a_public_unet(tmp_path, public_unets, fmt, layers, ours):
    """probe --unet-path: official layer names become ours, the file's schedule drives the noise, the grid is written."""
    out = tmp_path / "probe"
    m = dp.main(dp.build_parser().parse_args(
        ["probe", "--unet-path", public_unets[fmt], "--data", "shapes", "--image-size", "16", "--layers", *layers, "--t", "1", "50",
         "--labels-per-class", "4", "--n-test", "40", "--views", "1", "--probe-epochs", "2", "--batch-size", "40",
         "--no-raw-pixel", "--device", "cpu", "--out-dir", str(out)]))
    assert m["layers"] == ours and m["t"] == [1, 50] and 0 <= m["probe_best_acc"] <= 1
    assert json.load(open(out / "grid.json"))["layers"] == ours
    with pytest.raises(UserError, match="--ckpt or --unet-path, not both"):
        dp.main(dp.build_parser().parse_args(["probe", "--unet-path", public_unets[fmt], "--ckpt", public_unets[fmt], "--data", "shapes",
                                              "--device", "cpu", "--out-dir", str(tmp_path / "x")]))


def test_align_finetune_and_noisy_read_a_public_unet(tmp_path, public_unets):
    """The other stages take --unet-path too; the frozen trunk the noisy classifier trains on carries the file's weights."""
    from safetensors.torch import load_file
    common = ["--unet-path", public_unets["diffusers"], "--data", "shapes", "--image-size", "16", "--device", "cpu"]
    m = dp.main(dp.build_parser().parse_args(["align", *common, "--layers", "out_2", "mid_block", "--t", "1", "50", "--n-images", "32",
                                              "--batch-size", "32", "--out-dir", str(tmp_path / "align")]))
    assert m["layers"] == ["mid", "up.1"] and m["t"] == [1, 50]
    small = ["--labels-per-class", "4", "--n-test", "40", "--steps", "2", "--batch-size", "8", "--log-every", "1"]
    m = dp.main(dp.build_parser().parse_args(["finetune", *common, *small, "--layer", "down_blocks.0.downsamplers.0", "--t", "10",
                                              "--no-scratch", "--out-dir", str(tmp_path / "ft")]))
    assert m["layer"] == "down.1" and 0 <= m["finetune_acc"] <= 1
    dp.main(dp.build_parser().parse_args(["noisy", *common, *small, "--layer", "out_3", "--t", "1", "500",
                                          "--out-dir", str(tmp_path / "noisy")]))
    trunk = load_file(tmp_path / "noisy" / "ckpt" / "model.safetensors")
    ref = load_file(os.path.join(public_unets["diffusers"], "diffusion_pytorch_model.safetensors"))
    assert torch.equal(trunk["trunk.stem.weight"], ref["conv_in.weight"])
    qkv = trunk["trunk.up.1.attn.qkv.weight"][:, :, 0, 0]  # out_3 = up.3: the trunk holds up.0 .. up.3
    assert torch.equal(qkv, torch.cat([ref[f"up_blocks.0.attentions.1.to_{c}.weight"] for c in "qkv"]))
    with pytest.raises(UserError, match="a public UNet .*pass it as --unet-path"):
        dp.main(dp.build_parser().parse_args(["probe", "--ckpt", public_unets["adm"], "--data", "shapes", "--device", "cpu",
                                              "--out-dir", str(tmp_path / "x")]))


@pytest.mark.parametrize("fmt,layer,ours,dim", [("diffusers", "mid_block.resnets.1.conv2", "mid.block2.conv2", 32),
                                                ("adm", "middle_block.2.out_layers.3", "mid.block2.conv2", 64),
                                                ("adm", "out_2", "up.1", 64)])
def test_repfusion_distills_from_a_public_unet(tmp_path, public_unets, fmt, layer, ours, dim):
    """distill --teacher FILE: the official layer name reads the module inside the block (RepFusion's feature: the mid
    block's second res branch before the skip add), the teacher is frozen, the loss is finite, the image size is checked."""
    teacher = rf.load_teacher(public_unets[fmt], layer, "noised", "cpu", data_spec="shapes", image_size=16)
    assert teacher.layer == ours and teacher.T == 1000 and teacher.obj.schedule == ("cosine" if fmt == "adm" else "linear")
    assert not teacher.net.training and not any(p.requires_grad for p in teacher.net.parameters())
    m = rf.main(rf.build_parser().parse_args(
        ["distill", "--teacher", public_unets[fmt], "--teacher-layer", layer, "--data", "shapes", "--image-size", "16",
         "--out-dir", str(tmp_path / "d"), "--steps", "2", "--log-every", "1", "--t-policy", "fixed", "--t", "10",
         "--device", "cpu", "--student", "resnet18", "--width", "4", "--batch-size", "8"]))
    assert m["teacher_layer"] == ours and m["teacher_dim"] == dim and math.isfinite(m["final_feat_loss"])
    if fmt == "diffusers":  # no --teacher-layer with a diffusers folder: the official teacher feature
        assert rf.load_teacher(public_unets[fmt], None, "clean", "cpu", data_spec="shapes", image_size=16).layer == "mid.block2.conv2"
    with pytest.raises(UserError, match=r"images are \(3, 32, 32\), the UNet .* takes \(3, 16, 16\)"):
        rf.load_teacher(public_unets[fmt], layer, data_spec="shapes")
    with pytest.raises(UserError, match="a public UNet needs --data"):
        rf.load_teacher(public_unets[fmt], layer)
