"""
Speed measurements, one command: prints a table and writes bench.json. Each comparison is a ratio of two
figures measured in the same run, on the same device.

    python bench.py                  # small configs, CPU or GPU, a couple of minutes
    python bench.py --full           # the real sizes (DiT-B/2 on 32x32x4 latents, SD VAE at 256x256), GPU
    python bench.py --only dit_train dc_classify

Sections: dit_train (repcond pre-training step: eager fp32 vs bf16 + compile, img/s and MFU),
dc_classify (Diffusion Classifier Zero: batched images x classes vs a one-class-at-a-time loop),
vae_encode (our VAE vs diffusers' AutoencoderKL with the same weights, when diffusers is installed).
"""
import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

import repcond_dit as rd


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup, iters):
    """Median seconds per call after warm-up (compilation happens in the warm-up)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_dit_train(args, device):
    """One pre-training step (encoder + denoiser, the paper's joint loss) at the global batch."""
    C, H = (4, 32) if args.full else (3, 32)
    cfg = dict(model="DiT-B/2" if args.full else "DiT-XS/4", encoder="ViT-S/2" if args.full else "ViT-XS/4", rep_dim=256 if args.full else 64,
               inject="both", cond="rep", sample_shape=[C, H, H], num_classes=0, learn_sigma=False)
    B = args.batch_size or (256 if args.full else 32)
    diffusion = rd.Diffusion(device=device)
    dist = rd.Dist(device=str(device))
    z0 = torch.randn(B, C, H, H, device=device)
    rows = []
    modes = [("eager fp32", "none", False)]
    modes += [("bf16 + compile", "bf16", True)] if device.type == "cuda" else [("bf16 autocast", "bf16", False)]
    for name, amp, compile_ in modes:
        torch.manual_seed(0)
        model = rd.build_model(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        net = torch.compile(model) if compile_ else model
        flops = rd.transformer_flops_per_image(model.denoiser, (H // model.denoiser.patch_size) ** 2) + \
            rd.transformer_flops_per_image(model.encoder, (H // model.encoder.patch_size) ** 2)
        step = [0]

        def train_step():
            with rd.autocast(amp, device):
                loss = rd.diffusion_loss(net, diffusion, z0, step[0], 0, dist)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
        sec = timeit(train_step, device, args.warmup if not compile_ else max(args.warmup, 5), args.iters)
        img_s = B / sec
        row = {"section": "dit_train", "config": f"{cfg['model']} + {cfg['encoder']} on {C}x{H}x{H}, batch {B}", "mode": name, "img_s": img_s}
        if device.type == "cuda":
            row["mfu"] = flops * img_s / (args.peak_tflops * 1e12)
        rows.append(row)
        del model, opt, net
    rows[-1]["speedup"] = rows[-1]["img_s"] / rows[0]["img_s"]
    return rows


def bench_dc_classify(args, device):
    """DC0 errors for B images x K classes at one t: one batched call vs a loop over classes."""
    C, H = (4, 32) if args.full else (3, 32)
    K, B = (10, 64) if args.full else (10, 16)
    cfg = dict(model="DiT-B/2" if args.full else "DiT-XS/4", sample_shape=[C, H, H], num_classes=K, learn_sigma=False, cond="label")
    torch.manual_seed(0)
    model = rd.build_model(cfg).to(device).eval()
    amp = "bf16" if device.type == "cuda" else "none"
    diffusion = rd.Diffusion(device=device)
    z0 = torch.randn(B, C, H, H, device=device)
    if device.type == "cuda":
        model.denoiser = torch.compile(model.denoiser)

    @torch.no_grad()
    def batched():
        with rd.autocast(amp, device):
            rd.dc0_errors(model, diffusion, z0, 500, K, 1, torch.Generator(device=device).manual_seed(0), max_batch=B * K)

    @torch.no_grad()
    def one_class_at_a_time():  # what a straightforward port does: one forward per (image batch, class)
        g = torch.Generator(device=device).manual_seed(0)
        eps = torch.randn(z0.shape, generator=g, device=device)
        t = torch.full((B,), 500, device=device, dtype=torch.long)
        z_t = diffusion.q_sample(z0, t, eps)
        with rd.autocast(amp, device):
            for c in range(K):
                for i in range(B):
                    eps_hat = model.denoiser(z_t[i:i + 1], t[i:i + 1], y=torch.full((1,), c, device=device))
                    (z0[i:i + 1] - diffusion.predict_z0(z_t[i:i + 1], t[i:i + 1], eps_hat[:, :C].float())).pow(2).mean()
    s_b = timeit(batched, device, args.warmup, args.iters)
    s_l = timeit(one_class_at_a_time, device, 1, max(1, args.iters // 3))
    name = f"{cfg['model']} on {C}x{H}x{H}, {K} classes, 1 t"
    return [{"section": "dc_classify", "config": name, "mode": "one image x one class per forward", "img_s": B / s_l},
            {"section": "dc_classify", "config": name, "mode": f"batched images x classes{' + compile' if device.type == 'cuda' else ''}",
             "img_s": B / s_b, "speedup": s_l / s_b}]


def bench_vae_encode(args, device):
    """Our VAE encoder vs diffusers' AutoencoderKL with the same random weights (diffusers layout file)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return [{"section": "vae_encode", "config": "diffusers not installed", "mode": "skipped", "img_s": float("nan")}]
    import tempfile
    from safetensors.torch import save_file
    import vae
    full = args.full
    size, B = (256, 32) if full else (64, 8)
    blocks = (128, 256, 512, 512) if full else (32, 64)
    ref = AutoencoderKL(block_out_channels=blocks, layers_per_block=2 if full else 1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "diffusion_pytorch_model.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        ours = vae.load(path, device=device).eval()
    ref = ref.to(device).eval()
    x = torch.rand(B, 3, size, size, device=device) * 2 - 1
    amp = "bf16" if device.type == "cuda" else "none"
    rows = []
    for name, fn in (("diffusers AutoencoderKL", lambda: ref.encode(x).latent_dist.mean), ("vae.py", lambda: ours.encode(x).mean)):
        def run():
            with torch.no_grad(), rd.autocast(amp, device):
                fn()
        rows.append({"section": "vae_encode", "config": f"{'SD kl-f8' if full else 'small'} at {size}x{size}, batch {B}, {amp}",
                     "mode": name, "img_s": B / timeit(run, device, args.warmup, args.iters)})
    rows[-1]["speedup"] = rows[-1]["img_s"] / rows[0]["img_s"]
    return rows


SECTIONS = {"dit_train": bench_dit_train, "dc_classify": bench_dc_classify, "vae_encode": bench_vae_encode}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="real model sizes (meant for a GPU)")
    p.add_argument("--only", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    p.add_argument("--out", default="bench.json")
    args = p.parse_args()
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # "eager fp32" means fp32, not tf32
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} threads, {platform.processor() or platform.machine()})"
    rows = []
    for s in args.only:
        rows += SECTIONS[s](args, device)
        print(f"done: {s}", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "full": args.full, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{report['date']}, {name}, torch {torch.__version__}")
    print(f"| section | config | mode | img/s | MFU | speed-up |\n|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"| {r['section']} | {r['config']} | {r['mode']} | {r['img_s']:.1f} | {mfu} | {sp} |")


if __name__ == "__main__":
    main()
