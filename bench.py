"""
Speed of all four methods, one command: prints a table (date and device on its first line) and writes bench.json
with the same rows. Every comparison is a ratio of two figures measured in the same run, on the same device.

    python bench.py                  # small configs, a few minutes on 2 CPU cores (--threads 1 on a shared machine)
    python bench.py --full           # the real sizes, meant for a GPU
    python bench.py --only dc_classify elbo_classify probe_grid

Sections, baseline -> fast path (ratio = fast over baseline, > 1 is faster):
  dit_train        repcond_dit.py pre-training step, DiT + ViT encoder      eager fp32 -> bf16 + compile: img/s, MFU
  dc_train         diffusion_classifier.py class-conditional DiT step       eager fp32 -> bf16 + compile: img/s, MFU
  ddae_train       ddae_probe.py UNet diffusion pre-training step           eager fp32 -> bf16 + compile: img/s
  repfusion_train  repfusion.py distillation step: frozen teacher features + student/policy/head forward-backward,
                                                                            eager fp32 -> bf16 + compile: img/s
  vae_encode       VAE encoder, same weights                                diffusers AutoencoderKL -> vae.py: img/s
  sd_unet          Stable Diffusion UNet pass, same weights                 diffusers UNet2DConditionModel -> sd.py: img/s
  dc_classify      Diffusion Classifier Zero, 1 t                           one forward per (image, class) -> batched: img/s
  elbo_classify    diffusion_classifier.py ELBO classification              exhaustive -> paper's adaptive schedule: img/s, NFE
  probe_grid       ddae_probe.py layer x t linear-probe grid                one run per cell -> batched grid: seconds
On the CPU the fast training path is bf16 autocast without compile (compiling costs more than these runs take).
--full: DiT-B/2 (+ ViT-S/2 encoder) on 32x32x4 latents, batch 256; the DDPM (35.7M) and DDPM++ (55.7M) UNets at
32x32, batch 128; ResNet-18 student (width 64) distilled from the DDPM UNet's `mid` block, batch 128; SD VAE at 256;
classification with DiT-B/2, 10 classes, M = 500 slots (--n-samples 50 500 --to-keep 5 1); every layer x 7 t of
the DDPM UNet for the probe grid. Classification uses random weights (the figures are speeds, not accuracies); the
adaptive schedule's NFE does not depend on the weights (each stage keeps a fixed number of classes).
"""
import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F

import cli
import repcond_dit as rd
import models
import training

# ----------------------------------------------------------------------------------------------
# Timing


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


def size(args, smoke, small, full):
    """The value of a setting for this run's size: --smoke (the test), default (CPU), --full (GPU)."""
    return full if args.full else smoke if args.smoke else small


def speedup(base, fast, key="img_s"):
    """Mark `fast` as compared with `base` (two rows of this run): ratio = fast img/s / base img/s, or for a
    time, base seconds / fast seconds; > 1 means the fast path is faster."""
    fast["ratio"] = fast[key] / base[key] if key == "img_s" else base[key] / fast[key]
    fast["baseline"] = base["mode"]
    return fast


def modes(device):
    """(name, amp, compile) of a training comparison: eager fp32, then the fast path for this device."""
    fast = ("bf16 + compile", "bf16", True) if device.type == "cuda" else ("bf16 autocast", "bf16", False)
    return [("eager fp32", "none", False), fast]


def random_weights(model, std=0.02):
    """Re-draw every parameter N(0, std) and the class embeddings N(0, 1): adaLN-Zero starts the DiT's output at 0,
    which would make every class's error equal (a tie), and small class embeddings leave near-ties (relative gaps
    of 1e-6, the size of float rounding) that would make "same prediction" a coin toss."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_(0, 1)
    return model


def train_rows(args, device, section, config, B, build, loss_fn, flops=None, conv=False, prepare=None):
    """img/s of one training step (forward, backward, AdamW step; fused on CUDA) in each of modes(device).
    build() -> a fresh module (same seed in every mode); loss_fn(net, model, step) -> scalar loss, where net
    is the (compiled) module and model the plain one; flops(model) -> training FLOPs per image (MFU);
    prepare(compile) runs before each mode (RepFusion compiles its frozen teacher too)."""
    rows = []
    for mode, amp, compile_ in modes(device):
        if prepare is not None:
            prepare(compile_)  # (may run a script's set-up, which turns TF32 on)
        if device.type == "cuda":  # "eager fp32" means fp32, not TF32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        model = build().to(device).train()
        if conv and device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")
        net = torch.compile(model) if compile_ else model
        step = [0]

        def train_step():
            with training.autocast(amp, device):
                loss = loss_fn(net, model, step[0])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step[0] += 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timeit(train_step, device, max(args.warmup, 3) if compile_ else args.warmup, args.iters)
        row = {"section": section, "config": f"{config}, batch {B}", "mode": mode, "img_s": B / sec}
        if device.type == "cuda":
            if flops is not None:
                row["mfu"] = flops(model) * row["img_s"] / (args.peak_tflops * 1e12)
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        rows.append(row)
        del model, opt, net
    speedup(rows[0], rows[-1])
    return rows


# ----------------------------------------------------------------------------------------------
# Training steps, one per method


def bench_dit_train(args, device):
    """repcond_dit.py: one pre-training step (encoder + denoiser, the paper's joint loss) at the global batch."""
    C, H = size(args, (3, 16), (3, 32), (4, 32))
    cfg = dict(model=size(args, "DiT-XS/4", "DiT-XS/4", "DiT-B/2"), encoder=size(args, "ViT-XS/4", "ViT-XS/4", "ViT-S/2"),
               rep_dim=size(args, 64, 64, 256), inject="both", cond="rep", sample_shape=[C, H, H], num_classes=0, learn_sigma=False)
    B = args.batch_size or size(args, 4, 32, 256)
    diffusion, dist = models.Diffusion(device=device), training.Dist(device=str(device))
    z0 = torch.randn(B, C, H, H, device=device)

    def flops(model):
        return training.transformer_flops_per_image(model.denoiser, (H // model.denoiser.patch_size) ** 2) + \
            training.transformer_flops_per_image(model.encoder, (H // model.encoder.patch_size) ** 2)
    return train_rows(args, device, "dit_train", f"{cfg['model']} + {cfg['encoder']} on {C}x{H}x{H}", B, lambda: models.build_model(cfg),
                      lambda net, model, step: models.diffusion_loss(net, diffusion, z0, step, 0, dist), flops)


def bench_dc_train(args, device):
    """diffusion_classifier.py `train`: one class-conditional DiT step (eps-MSE, label dropout 0.1), its build_model config."""
    C, H = size(args, (3, 16), (3, 32), (4, 32))
    K = size(args, 10, 10, 1000)
    cfg = dict(model=size(args, "DiT-XS/4", "DiT-XS/4", "DiT-B/2"), cond="label", inject=None, rep_dim=0, sample_shape=[C, H, H],
               num_classes=K, learn_sigma=False, class_dropout=0.1)
    B = args.batch_size or size(args, 4, 32, 256)
    diffusion, dist = models.Diffusion(device=device), training.Dist(device=str(device))
    z0 = torch.randn(B, C, H, H, device=device)
    y = torch.randint(0, K, (B,), device=device)
    return train_rows(args, device, "dc_train", f"{cfg['model']} on {C}x{H}x{H}, {K} classes", B, lambda: models.build_model(cfg),
                      lambda net, model, step: models.diffusion_loss(net, diffusion, z0, step, 0, dist, y=y, class_dropout=0.1),
                      lambda model: training.transformer_flops_per_image(model.denoiser, (H // model.denoiser.patch_size) ** 2))


def bench_ddae_train(args, device):
    """ddae_probe.py `pretrain`: one unconditional UNet step; --full: the DDPM UNet (35.7M, ddpm objective) and EDM's
    DDPM++ (55.7M, edm objective), both on 32x32 images at batch 128 (DDPM's; EDM's 512 was over 8 GPUs)."""
    H = size(args, 16, 32, 32)
    presets = size(args, [("tiny", "ddpm", 4)], [("tiny", "ddpm", 32)], [("ddpm", "ddpm", 128), ("ddpmpp", "edm", 128)])
    dist = training.Dist(device=str(device))
    rows = []
    for preset, objective, B in presets:
        B = args.batch_size or B
        obj = models.make_objective({"objective": objective}, device)
        x0 = torch.rand(B, 3, H, H, device=device) * 2 - 1
        x0 = x0.to(memory_format=models.mem_format(x0))  # channels_last on CUDA, as pretrain
        build = lambda preset=preset: models.UNet(**dict(cli.UNet_models[preset], in_channels=3, image_size=H))  # noqa: E731
        rows += train_rows(args, device, "ddae_train", f"UNet {preset} ({objective}) on 3x{H}x{H}", B, build,
                           lambda net, model, step, obj=obj, x0=x0: obj.loss(net, x0, step, 0, dist), conv=True)
    return rows


_CKPT = {}


def ddae_checkpoint(args, device):
    """A ddae_probe.py `pretrain` checkpoint (a few steps on `shapes`), made once per run: the probe grid reads it,
    and it is RepFusion's teacher. -> (checkpoint folder, UNet preset, image size)."""
    if "dir" not in _CKPT:
        import ddae_probe as dp
        preset, H, steps, B = size(args, ("tiny", 16, 2, 8), ("tiny", 32, 10, 32), ("ddpm", 32, 30, 128))
        out = os.path.join(args.work_dir, "ddae")
        t0 = time.time()
        dp.pretrain(dp.build_parser().parse_args(
            ["pretrain", "--out-dir", out, "--data", "shapes", "--image-size", str(H), "--model", preset, "--device", device.type,
             "--steps", str(steps), "--batch-size", str(B), "--lr", "2e-3", "--warmup", "0", "--ema-decay", "0.9",
             "--log-every", str(steps), "--ckpt-every", str(steps), "--no-compile"]))
        print(f"  ddae_probe checkpoint ({preset}, {steps} steps on shapes {H}x{H}): {time.time() - t0:.1f} s", flush=True)
        _CKPT.update(dir=os.path.join(out, "ckpt"), preset=preset, size=H)
    return _CKPT["dir"], _CKPT["preset"], _CKPT["size"]


def bench_repfusion_train(args, device):
    """repfusion.py `distill` (--t-policy rl, --feat-loss mse): per step the policy draws t per image, the frozen
    teacher (a ddae_probe UNet read at `mid`, the official default) gives f_T(x_t, t), and the student (+ projector),
    task head and policy train. The teacher is compiled with the student in the compile mode, as distill does."""
    import repfusion as rf
    ckpt, preset, H = ddae_checkpoint(args, device)
    B = args.batch_size or size(args, 4, 32, 128)
    teacher = rf.load_teacher(ckpt, None, "noised", device)
    teacher.probe_shape((3, H, H), device)
    raw_teacher = teacher.net
    student, width, n_bins = "resnet18", size(args, 8, 16, 64), size(args, 10, 10, 1000)
    cfg = dict(student=student, width=width, sample_shape=[3, H, H], feat_loss="mse", at_stage=3, teacher_dim=teacher.dim,
               t_policy="rl", t_bins=n_bins, num_classes=10, head_hidden=256)
    x = torch.rand(B, 3, H, H, device=device) * 2 - 1
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (B,), device=device)
    T = teacher.T

    def prepare(compile_):
        teacher.net = raw_teacher
        if compile_:
            teacher.compile()  # as distill does on CUDA

    def loss_fn(net, model, step):
        g = training.step_generator(0, step, device)
        u_pick, u_bin = torch.rand(B, generator=g, device=device), torch.rand(B, generator=g, device=device)
        eps = torch.randn(B, *teacher.noise_shape(x), generator=g, device=device)
        with torch.no_grad():
            t_bin = rf.sample_categorical(F.softmax(model.policy(x).float(), dim=1), u_pick)
        t = ((t_bin + u_bin) * (T / n_bins)).long().clamp(max=T - 1)
        f_t, m_t = teacher(x, t, eps)
        out = net(x, y, f_t, m_t)
        reward = -out["head_ce"].detach()
        pg, _ = rf.reinforce_loss(out["logits"], t_bin, reward - reward.mean(), 0.1)
        return out["feat"] + out["head_ce"].mean() + pg
    rows = train_rows(args, device, "repfusion_train", f"{student} (width {width}) <- UNet {preset} mid, 3x{H}x{H}, {n_bins} t bins", B,
                      lambda: rf.for_device(rf.RepFusion(cfg), training.Dist(device=str(device))), loss_fn, conv=True, prepare=prepare)
    teacher.net = raw_teacher
    return rows


# ----------------------------------------------------------------------------------------------
# Inference: the VAE, the classifiers, the probe grid


def bench_vae_encode(args, device):
    """Our VAE encoder vs diffusers' AutoencoderKL with the same random weights (diffusers layout file)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return [{"section": "vae_encode", "config": "diffusers not installed", "mode": "skipped", "img_s": float("nan")}]
    from safetensors.torch import save_file
    import vae
    res, B = size(args, (32, 2), (64, 8), (256, 32))
    blocks = (128, 256, 512, 512) if args.full else (32, 64)
    ref = AutoencoderKL(block_out_channels=blocks, layers_per_block=2 if args.full else 1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks))
    path = os.path.join(args.work_dir, "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = vae.load(path, device=device).eval()
    ref = ref.to(device).eval()
    x = torch.rand(B, 3, res, res, device=device) * 2 - 1
    amp = "bf16" if device.type == "cuda" else "none"
    rows = []
    for name, fn in (("diffusers AutoencoderKL", lambda: ref.encode(x).latent_dist.mean), ("vae.py", lambda: ours.encode(x).mean)):
        def run():
            with torch.no_grad(), training.autocast(amp, device):
                fn()
        rows.append({"section": "vae_encode", "config": f"{'SD kl-f8' if args.full else 'small'} at {res}x{res}, batch {B}, {amp}",
                     "mode": name, "img_s": B / timeit(run, device, args.warmup, args.iters)})
    speedup(rows[0], rows[1])
    return rows


def bench_sd_unet(args, device):
    """sd.py's Stable Diffusion UNet vs diffusers' UNet2DConditionModel at the same random weights (a diffusers folder
    read by sd.load): img/s of one denoiser pass, and the largest output difference. --full: the SD 2 base UNet
    (865M parameters, head dim 64, linear projections, 1024-d text) on 64x64x4 latents (512 px), batch 32, fp16."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return [{"section": "sd_unet", "config": "diffusers not installed", "mode": "skipped", "img_s": float("nan")}]
    import sd
    blocks = size(args, (32, 64), (64, 128, 128), (320, 640, 1280, 1280))
    n = len(blocks)
    ctx_dim = size(args, 64, 256, 1024)
    ref = UNet2DConditionModel(
        block_out_channels=blocks, layers_per_block=size(args, 1, 2, 2), cross_attention_dim=ctx_dim,
        attention_head_dim=[c // 64 if c >= 64 else 1 for c in blocks], use_linear_projection=True, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1))
    random_weights(ref)
    folder = os.path.join(args.work_dir, "sd_unet")
    ref.save_pretrained(folder)
    ours, _ = sd.load_diffusers_unet(folder)
    res, B = size(args, (8, 2), (16, 4), (64, 32))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    ref, ours = ref.to(device, dtype).eval(), ours.to(device, dtype).eval()
    x = torch.randn(B, 4, res, res, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (B,), device=device)
    ctx = torch.randn(B, 77, ctx_dim, device=device, dtype=dtype)
    with torch.no_grad():
        diff = (ref(x, t, encoder_hidden_states=ctx).sample.float() - ours(x, t, ctx).float()).abs().max().item()
    rows = []
    for name, fn in (("diffusers UNet2DConditionModel", lambda: ref(x, t, encoder_hidden_states=ctx).sample), ("sd.py", lambda: ours(x, t, ctx))):
        def run():
            with torch.no_grad():
                fn()
        rows.append({"section": "sd_unet", "config": f"{'SD 2 base' if args.full else 'small'} UNet at {res}x{res}x4, batch {B}, "
                     f"{str(dtype).split('.')[1]}", "mode": name, "img_s": B / timeit(run, device, args.warmup, args.iters)})
    rows[1]["max_abs_diff"] = diff
    # the paper's adaptive schedule (50 then 500 slots, keep 5 then 1) costs K * 50 + 5 * 450 passes per image
    rows[1]["passes_per_image_paper_K10"] = 10 * 50 + 5 * 450
    speedup(rows[0], rows[1])
    return rows


def bench_dc_classify(args, device):
    """DC0 errors of B images x K classes at one t (repcond_dit.dc0_errors): one batched call (compiled on CUDA)
    vs an eager loop with one forward per (image, class). Both use the same eps, so they must agree."""
    C, H = size(args, (3, 16), (3, 32), (4, 32))
    K, B = size(args, (10, 4), (10, 16), (10, 64))
    cfg = dict(model=size(args, "DiT-XS/4", "DiT-XS/4", "DiT-B/2"), sample_shape=[C, H, H], num_classes=K, learn_sigma=False, cond="label")
    torch.manual_seed(0)
    model = random_weights(models.build_model(cfg)).to(device).eval()
    raw = model.denoiser
    amp = "bf16" if device.type == "cuda" else "none"
    diffusion = models.Diffusion(device=device)
    z0 = torch.randn(B, C, H, H, device=device)
    if device.type == "cuda":
        model.denoiser = torch.compile(raw)
    out = {}
    eps = torch.randn(z0.shape, generator=torch.Generator(device=device).manual_seed(0), device=device)  # one draw, shared

    @torch.no_grad()
    def batched():
        with training.autocast(amp, device):
            out["batched"] = rd.dc0_errors(model, diffusion, z0, 500, K, eps[None], max_batch=B * K)

    @torch.no_grad()
    def one_at_a_time():  # what a straightforward port does: one eager forward per (image, class)
        t = torch.full((B,), 500, device=device, dtype=torch.long)
        z_t = diffusion.q_sample(z0, t, eps)
        err = torch.zeros(B, K, device=device)
        with training.autocast(amp, device):
            for c in range(K):
                for i in range(B):
                    eps_hat = raw(z_t[i:i + 1], t[i:i + 1], y=torch.full((1,), c, device=device))
                    err[i, c] = (z0[i:i + 1] - diffusion.predict_z0(z_t[i:i + 1], t[i:i + 1], eps_hat[:, :C].float())).pow(2).mean()
        out["loop"] = err
    s_b = timeit(batched, device, args.warmup, args.iters)
    s_l = timeit(one_at_a_time, device, 1, max(1, args.iters // 3))
    name = f"{cfg['model']} (random weights) on {C}x{H}x{H}, {K} classes, 1 t, {B} images"
    agree = (out["batched"].argmin(1) == out["loop"].argmin(1)).float().mean().item()
    rows = [{"section": "dc_classify", "config": name, "mode": "one image x one class per forward", "img_s": B / s_l, "nfe_per_image": K},
            {"section": "dc_classify", "config": name, "mode": f"batched images x classes{' + compile' if device.type == 'cuda' else ''}",
             "img_s": B / s_b, "nfe_per_image": K, "same_pred": agree}]
    speedup(rows[0], rows[1])
    return rows


def bench_elbo_classify(args, device):
    """diffusion_classifier.py ELBO classification (eps-error, paired noise over M stratified timesteps, its ErrorFn
    and run_policy; bf16 + compile on CUDA): the exhaustive schedule (all K classes x M slots) against the paper's
    adaptive one (M/10 slots for every class, keep the best 5, the rest of the slots for them, keep 1:
    --n-samples 50 500 --to-keep 5 1 at M = 500). img/s and mean NFE per image measured in the same run."""
    import diffusion_classifier as dc
    C, H = size(args, (3, 16), (3, 32), (4, 32))
    K, M, N = size(args, (10, 10, 4), (10, 20, 8), (10, 500, 8))
    max_batch = size(args, 64, 256, 1024)
    model_name = size(args, "DiT-XS/4", "DiT-XS/4", "DiT-B/2")
    cfg = dict(model=model_name, sample_shape=[C, H, H], num_classes=K, learn_sigma=False, cond="label")
    torch.manual_seed(0)
    den = dc.Denoiser(random_weights(models.build_model(cfg)).denoiser, K, (C, H, H)).to(device).eval()
    diffusion = models.Diffusion(1000, device=device)
    grid = dc.timestep_grid(1000, M)
    cuda = device.type == "cuda"
    err_fn = dc.ErrorFn(den, diffusion, grid, max_batch=max_batch, amp="bf16" if cuda else "none", compile=cuda)
    z0 = torch.randn(N, C, H, H, device=device)
    noise = torch.stack([dc.slot_noise((C, H, H), M, 0, 0, i, device) for i in range(N)])  # (N, M, C, H, W)
    schedules = [("exhaustive", dc.full_policy(M)), (f"adaptive {M // 10}/{M}, keep 5/1", dc.paper_policy(M, [M // 10, M], [5, 1]))]
    rows, preds = [], {}
    for name, policy in schedules:
        def classify(policy=policy, name=name):
            r = dc.run_policy(err_fn.bind(z0, noise), N, K, M, policy, None, device)
            preds[name] = (r["pred"], r["nfe"])
        sec = timeit(classify, device, 1, max(1, args.iters // 3))
        pred, nfe = preds[name]
        rows.append({"section": "elbo_classify", "config": f"{model_name} (random weights) on {C}x{H}x{H}, {K} classes, M={M}, {N} images",
                     "mode": name, "img_s": N / sec, "nfe_per_image": nfe.float().mean().item()})
    speedup(rows[0], rows[1])
    rows[1]["nfe_ratio"] = rows[0]["nfe_per_image"] / rows[1]["nfe_per_image"]
    rows[1]["same_pred"] = (preds[schedules[0][0]][0] == preds[schedules[1][0]][0]).float().mean().item()
    return rows


def bench_probe_grid(args, device):
    """ddae_probe.bench_grid on the run's ddae_probe checkpoint: one probe run per (layer, t) cell (a forward per
    cell hooking one layer, one head trained alone) vs the batched grid (per t one forward for all layers, all heads in
    one batched matmul), same data and protocol. --full: every layer x the 7 default t of the DDPM UNet."""
    import ddae_probe as dp
    ckpt, preset, _ = ddae_checkpoint(args, device)
    layers = None  # --full: every layer
    if not args.full:
        names = models.UNet(**cli.UNet_models[preset]).layer_names()
        layers = names[::6] if args.smoke else names[1::3]
    t = size(args, [1, 101], [1, 26, 101], None)  # the paper's t of a UNet, counted from 1 as DDAE's code
    lpc, n_test, epochs = size(args, (3, 20, 2), (10, 100, 5), (20, 200, 15))
    # warm-up (allocator, oneDNN/cuDNN set-up, data on the device): else the grid, timed first, pays for it alone
    dp.bench_grid(ckpt, t=[1], layers=["mid"], labels_per_class=lpc, n_test=n_test, views=1, probe_epochs=1, device=device.type)
    r = dp.bench_grid(ckpt, t=t, layers=layers, labels_per_class=lpc, n_test=n_test, views=1, probe_epochs=epochs,
                      device=device.type)
    config = f"UNet {preset}, {r['layers']} layers x {r['levels']} t = {r['cells']} cells, {r['n_train']} train / {r['n_test']} test, {epochs} epochs"
    rows = [{"section": "probe_grid", "config": config, "mode": "one run per cell", "seconds": r["naive_s"]},
            {"section": "probe_grid", "config": config, "mode": "batched grid", "seconds": r["grid_s"],
             "max_abs_acc_diff": r["max_abs_acc_diff"]}]
    speedup(rows[0], rows[1], key="seconds")
    return rows


SECTIONS = {"dit_train": bench_dit_train, "dc_train": bench_dc_train, "ddae_train": bench_ddae_train,
            "repfusion_train": bench_repfusion_train, "vae_encode": bench_vae_encode, "sd_unet": bench_sd_unet,
            "dc_classify": bench_dc_classify,
            "elbo_classify": bench_elbo_classify, "probe_grid": bench_probe_grid}


# ----------------------------------------------------------------------------------------------
# The table


def table(report):
    """Markdown table of the report's rows, under a header line with the date and the device."""
    lines = [f"date {report['date']} | device {report['device']} | torch {report['torch']} | "
             f"{'--full' if report['full'] else '--smoke' if report.get('smoke') else 'small'} configs | {report['threads']} threads",
             "| section | config | mode | figure | NFE/image | MFU | ratio |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        fig = f"{r['img_s']:.1f} img/s" if "img_s" in r else f"{r['seconds']:.2f} s"
        nfe = f"{r['nfe_per_image']:.0f}" if "nfe_per_image" in r else ""
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        notes = [f"NFE {r['nfe_ratio']:.2f}x fewer" if "nfe_ratio" in r else "",
                 f"same prediction {100 * r['same_pred']:.0f}%" if "same_pred" in r else "",
                 f"max acc diff {r['max_abs_acc_diff']:.3g}" if "max_abs_acc_diff" in r else ""]
        notes = "; ".join(n for n in notes if n)
        lines.append(f"| {r['section']} | {r['config']} | {r['mode']} | {fig} | {nfe} | {mfu} | {ratio}{f' ({notes})' if notes else ''} |")
    secs = ", ".join(f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}" for k, v in report["sections"].items())
    lines.append(f"\nseconds wall/CPU per section: {secs}; total {report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="real model sizes (meant for a GPU)")
    p.add_argument("--smoke", action="store_true", help="the smallest configs, to check that every section runs (the test)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                   help=f"run these sections only (default: all): {' '.join(SECTIONS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=None, help="override every training section's batch")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's; on a shared machine 1 is often faster)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    p.add_argument("--out", default="bench.json")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.full and args.smoke:
        raise SystemExit("error: --full and --smoke exclude each other")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    rows, sections = [], {}
    t_all, c_all = time.time(), time.process_time()
    args.work_dir = tempfile.mkdtemp(prefix="bench_")
    _CKPT.clear()
    try:
        for s in args.only:
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False  # "eager fp32" means fp32, not tf32 (scripts' set-up turns it on)
                torch.backends.cudnn.allow_tf32 = False
                torch._dynamo.reset()  # no compile cache or recompile limit carried over from the last section
            t0, c0 = time.time(), time.process_time()
            rows += SECTIONS[s](args, device)
            sections[s] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
            print(f"done: {s} ({sections[s]['wall_s']:.1f} s wall, {sections[s]['cpu_s']:.1f} s CPU)", flush=True)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "full": args.full, "smoke": args.smoke,
              "threads": torch.get_num_threads(), "sections": sections, "rows": rows,
              "wall_s": time.time() - t_all, "cpu_s": time.process_time() - c_all}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + table(report))
    return report


if __name__ == "__main__":
    main()
