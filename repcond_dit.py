"""
Representation-conditioned latent DiT, label tuning and Diffusion Classifier Zero.

Paper: "Image Classification Using a Diffusion Model as a Pre-Training Model" (arXiv 2505.06890).
A ViT encoder f_phi reads the clean latent z0 and its representation
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

The model, f_phi (`ViTEncoder`) and g_theta (`DiT`, the official release's architecture and parameter names)
joined by `RepCondDiT`, is in models.py, because the other method files read its checkpoints too; this file
holds the paper's loss, its stages and its bare run. Run plumbing (fit, checkpoints, logs) is training.py's.
"""
import argparse
import json
import os
import time
from functools import partial

from cli import (add_common_args, add_train_args, answer_early, DiT_models, DIT_RECIPE, HelpFormatter, INCEPTION_FILE,
                 run, ViT_models)


# ----------------------------------------------------------------------------------------------
# The command line: first, and standard library only, so that --help answers before torch loads


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    add_common_args(p, "runs/repcond")
    p.add_argument("--steps", type=int, default=600, help="pipeline: pretrain steps (each of the two runs)")
    p.add_argument("--tune-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--t", type=int, nargs="+", default=[50, 100, 200, 300, 400], help="pipeline: the t sweep of classify")
    p.add_argument("--n-noise", type=int, default=8, help="pipeline: noise draws averaged per (image, t) in classify (the paper's "
                                                          "E over eps; 2 -> 8 draws: shapes 0.432 -> 0.482, digits README)")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser = partial(sub.add_parser, formatter_class=HelpFormatter)

    q = sub.add_parser("pretrain", help="joint encoder + denoiser training on unlabeled data", allow_abbrev=False)
    add_common_args(q, "runs/repcond/pretrain")
    add_train_args(q, steps=400_000, batch_size=256, lr=1e-4, **DIT_RECIPE)
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
    add_common_args(q, "runs/repcond/tune", data=False, test=False)
    add_train_args(q, steps=20_000, batch_size=256, lr=1e-4, **DIT_RECIPE)
    q.add_argument("--ckpt", required=True, help="a pretrain checkpoint folder (OUT_DIR/ckpt)")
    q.add_argument("--labels-per-class", type=int, default=None, help="required, or --labeled-fraction: labeled images per class")
    q.add_argument("--labeled-fraction", type=float, default=None)
    q.add_argument("--class-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    q.add_argument("--label-init", default="rep-mean", choices=["rep-mean", "random"],
                   help="rep-mean: start label k at the class-mean representation embedding")
    q.add_argument("--map-init", default="mean", choices=["mean", "drop"],
                   help="inject both/input: the decode map at the denoiser's input becomes its mean over the labeled images "
                        "(folded into pos_embed), or is dropped")
    q.add_argument("--no-augment", action="store_true")

    q = sub.add_parser("classify", help="Diffusion Classifier Zero, with a timestep sweep", allow_abbrev=False)
    add_common_args(q, "runs/repcond/classify", data=False)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--t", type=int, nargs="+", default=[100, 200, 300, 400, 500, 600, 700, 800, 900])
    q.add_argument("--n-noise", type=int, default=8, help="noise draws averaged per (image, t): the paper's E over eps")
    q.add_argument("--n-test", type=int, default=0, help="classify a random subset of the test split (0: all)")
    q.add_argument("--n-val", type=int, default=200, help="train-split images, outside tune's labeled set, used to choose t (0: choose on test)")
    q.add_argument("--positive-class", type=int, default=1, help="two classes: the class whose F1 is reported as f1 (macro_f1 always)")
    q.add_argument("--batch-size", type=int, default=128, help="images per batch")
    q.add_argument("--max-batch", type=int, default=2048, help="denoiser batch (images x classes) per forward")

    q = sub.add_parser("probe", help="linear probe on the encoder's representation r", allow_abbrev=False)
    add_common_args(q, "runs/repcond/probe", data=False)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--labels-per-class", type=int, default=None, help="required, or --labeled-fraction: labeled images per class")
    q.add_argument("--labeled-fraction", type=float, default=None)

    q = sub.add_parser("sample", help="DDPM/DDIM samples, grid PNG, FID", allow_abbrev=False)
    add_common_args(q, "runs/repcond/sample", data=False)
    q.add_argument("--ckpt", required=True)
    q.add_argument("--n-images", type=int, default=64, help="images generated (without --fid)")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ddpm: ancestral (as DDPM and DiT), ddim: eta 0")
    q.add_argument("--sample-steps", type=int, default=None, help="default: T (the full chain); DiT's sample.py uses 250")
    q.add_argument("--cfg-scale", type=float, default=1.0)
    q.add_argument("--cfg-channels", type=int, default=None,
                   help="leading eps channels that get the guidance (default: 3 for an official DiT file, as its sample.py; else all)")
    q.add_argument("--fid", action="store_true", help="FID (clean-fid, Inception) against --fid-ref")
    q.add_argument("--fid-ref", default="train", choices=["train", "test"], help="FID's reference split (DiT, DDPM, EDM: train)")
    q.add_argument("--inception-path", default=None, help=f"FID's Inception weights ({INCEPTION_FILE}; default: clean-fid's cache)")
    q.add_argument("--n-fid", type=int, default=5000)
    return p


if __name__ == "__main__":
    answer_early(build_parser())  # --help, or a line argparse refuses, answered before the imports below

# the method's imports (torch takes about 2 s)
import torch
import torch.nn.functional as F

import data
from data import UserError
from training import (accuracy_f1, autocast, binary_f1, check_out_dir, cleanup_distributed, compile_default,
                      compute_fid, find_checkpoint, fit, gather_by_index, linear_probe, load_json,
                      load_state_dict_strict, load_weights, Progress, resolve_amp, RunLog, save_curve, save_heatmap,
                      save_image_grid, save_json, save_safetensors, setup_distributed, step_generator,
                      transformer_flops_per_image)
from models import build_model, Diffusion, diffusion_loss, load_run, sample_loop, test_split_spec
from vae import Space


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


def pretrain(args):
    """Joint training of f_phi and g_theta on unlabeled data (labels, if any, are never read)."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    ds = data.load(args.data, "train", args.image_size)
    test = data.load(args.test_data or args.data, "test", args.image_size)  # before training: a missing split stops nothing
    space = Space(ds, args.vae_path, dist.device, resolve_amp(args.amp, dist.device))
    cfg = dict(stage="pretrain", test_data=args.test_data, model=args.model, encoder=args.encoder, rep_dim=args.rep_dim, inject=args.inject, cond=args.cond,
               sample_shape=list(space.sample_shape), num_classes=0, learn_sigma=False, T=args.T, data=args.data,
               image_size=args.image_size, vae_path=args.vae_path, scaling_factor=space.scaling_factor, classes=ds.classes,
               freeze_encoder=args.freeze_encoder, amp=args.amp, args=vars(args))
    if args.model not in DiT_models or (args.cond == "rep" and args.encoder not in ViT_models):
        raise UserError(f"--model must be one of {sorted(DiT_models)} and --encoder one of {sorted(ViT_models)}")
    for flag, name, presets in (("--model", args.model, DiT_models), ("--encoder", args.encoder, ViT_models)):
        patch = presets[name]["patch_size"]
        if space.sample_shape[1] % patch and (flag == "--model" or args.cond == "rep"):
            raise UserError(f"{flag} {name}: patch size {patch} does not divide the input size {space.sample_shape[1]}")
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
    loss = eval_denoise_loss(ema, space, test, diffusion, dist.device, seed=args.seed)
    metrics = {"eval_loss": loss, "cond": args.cond, "inject": args.inject if args.cond == "rep" else None, "steps": args.steps}
    RunLog(args.out_dir, dist).metrics(metrics)
    if dist.is_main:
        print(f"pretrain done: held-out eps-MSE {loss:.4g} (cond {args.cond})")
    return metrics


@torch.no_grad()
def labeled_means(pre, space, ds, device, batch_size=256):
    """Over the labeled set: rep_embedder(f_phi(z0)) averaged per class, (K + 1, D) with the overall mean as the null
    row (the tuned label table's start: label k acts like the mean representation of class k), and the encoder's
    decode map averaged over all images, (C, H, W) (None without a decode head)."""
    sums = torch.zeros(ds.num_classes, pre.denoiser.hidden_size, device=device)
    counts = torch.zeros(ds.num_classes, device=device)
    map_sum = torch.zeros(space.sample_shape, device=device)
    for x, y, _ in data.iterate(ds, batch_size, device):
        tokens, r = pre.encoder(space.encode(x, generator=False))
        if pre.denoiser.rep_dim > 0:
            sums.index_add_(0, y, pre.denoiser.rep_embedder(r).float())
        if pre.encoder.decode_head:
            map_sum += pre.encoder.decode(tokens).float().sum(0)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
    means = sums / counts.clamp(min=1)[:, None]
    table = torch.cat([means, (sums.sum(0) / counts.sum().clamp(min=1))[None]])
    return table, map_sum / counts.sum().clamp(min=1) if pre.encoder.decode_head else None


def tune(args):
    """Swap representation conditioning for labels (encoder dropped, label embedder added) and fine-tune."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    pre, pcfg, ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data, kinds=("dit",))
    if not ds.classes or ds.labels is None:
        raise UserError(f"--data {pcfg['data']}: tune needs a labeled data set")
    labeled_idx = data.labeled_indices(ds, labels_per_class=args.labels_per_class, fraction=args.labeled_fraction, seed=args.seed)
    labeled = ds.subset(labeled_idx)
    # labeled_indices (into the train split): `classify` chooses t on train images outside this set
    cfg = dict(pcfg, stage="tune", cond="label", num_classes=len(ds.classes), classes=ds.classes, rep_dim=0, inject=None,
               class_dropout=args.class_dropout, init_from=args.ckpt, n_labeled=len(labeled), labeled_indices=labeled_idx.tolist(),
               args=vars(args))
    cfg["data"] = args.data or pcfg["data"]
    model = build_model(cfg)
    own = model.denoiser.state_dict()
    carried = {k: v for k, v in pre.denoiser.state_dict().items() if k in own}  # all but rep_embedder.*, map_embedder.*
    missing = [k for k in own if k not in carried]
    assert all(k.startswith("y_embedder.") for k in missing), missing
    model.denoiser.load_state_dict(carried, strict=False)
    if pre.encoder is not None:
        table, mean_map = labeled_means(pre, space, labeled.to(dist.device), dist.device)
        if pre.denoiser.rep_dim > 0 and args.label_init == "rep-mean":
            model.denoiser.y_embedder.embedding_table.weight.data.copy_(table.cpu())
        if mean_map is not None and args.map_init == "mean":
            # the decode map that pre-training always fed at the input, now its mean over the labeled images: a constant
            # token offset, folded into pos_embed so that the tuned model stays an official-format DiT
            with torch.no_grad():
                model.denoiser.pos_embed += pre.denoiser.map_embedder(mean_map[None]).cpu()  # (1, T, D)
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


def dc0_noise(idx, shape, seed, t, n_noise, device):
    """eps (n_noise, B, *shape) for the images idx (B,) at timestep t: draw d of image i is a function of
    (seed, i, d, t) alone, so neither --batch-size nor the number of processes changes any image's noise."""
    return torch.stack([torch.stack([torch.randn(shape, generator=data.keyed_generator(seed, i, d, t)) for i in idx.tolist()])
                        for d in range(n_noise)]).to(device)


@torch.no_grad()
def dc0_errors(model, diffusion, z0, t, num_classes, draws, max_batch=2048):
    """Diffusion Classifier Zero errors ||z0 - z0'(c)||^2 (mean over C, H, W): (B, K), averaged over the
    noise draws (n_noise, B, C, H, W). Each draw noises every image once and shares that eps across all K labels."""
    B = z0.shape[0]
    errs = torch.zeros(B, num_classes, device=z0.device)
    labels = torch.arange(num_classes, device=z0.device)
    for eps in draws:
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
    return errs / len(draws)


@torch.no_grad()
def dc0_sweep(model, space, ds, index, diffusion, ts, n_noise, seed, dist, batch_size, max_batch):
    """Errors (len(ts), N, K) of DC0 on a data set, sharded over ranks. index (N,): each row's index in its split,
    which keys its noise: image index[i] gets the noise of (seed, index[i], draw, t) in every run."""
    K, N = model.denoiser.num_classes, len(ds)
    out = torch.zeros(len(ts), N, K, device=dist.device)
    bar = Progress("classify", len(ts) * N, dist)
    for i, t in enumerate(ts):
        rows = [torch.zeros(0, K, device=dist.device)]  # a rank may get no images
        idxs = [torch.zeros(0, dtype=torch.long, device=dist.device)]
        for x, _, idx in data.iterate(ds, batch_size, dist.device, rank=dist.rank, world_size=dist.world_size):
            z0 = space.encode(x, generator=False)
            eps = dc0_noise(index[idx.cpu()], z0.shape[1:], seed, t, n_noise, dist.device)
            rows.append(dc0_errors(model, diffusion, z0, t, K, eps, max_batch))
            idxs.append(idx.to(dist.device))
            bar.update(len(idx) * dist.world_size, f" | t = {t}")
        out[i] = gather_by_index(torch.cat(rows), torch.cat(idxs), N, dist)
    return out


def classify(args):
    """Diffusion Classifier Zero over a timestep sweep; t is chosen on a validation split, reported on test."""
    dist = setup_distributed(args.device, args.amp)
    model, cfg, train_ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data, kinds=("dit",))
    if cfg.get("num_classes", 0) <= 0:
        raise UserError(f"--ckpt {args.ckpt}: classify needs a label-conditioned checkpoint (run `tune` first)")
    K = cfg["num_classes"]
    test = data.load(test_split_spec(args, cfg), "test", cfg.get("image_size"))
    if test.labels is None:
        raise UserError("classify needs a labeled test split")
    # label i of the data must mean the tuned model's class i: match by name
    test = data.relabel(test, cfg["classes"], f"--data {args.data}" if args.data else "the test split")
    train_ds = data.relabel(train_ds, cfg["classes"], f"--data {args.data}" if args.data else "the train split")
    if K == 2 and not 0 <= args.positive_class < 2:
        raise UserError(f"--positive-class {args.positive_class}: a binary task's classes are 0 and 1")
    g = torch.Generator().manual_seed(args.seed)
    test_idx = torch.arange(len(test))
    if args.n_test and args.n_test < len(test):
        test_idx = torch.randperm(len(test), generator=g)[:args.n_test]
        test = test.subset(test_idx)
    # t is chosen on train images that `tune` never saw (its labeled_indices), when this is the train split it read
    same_split = args.data in (None, cfg.get("data"))
    tuned_on = torch.tensor(cfg.get("labeled_indices", []) if same_split else [], dtype=torch.long)
    unseen = torch.ones(len(train_ds), dtype=torch.bool)
    unseen[tuned_on] = False
    val_idx = torch.nonzero(unseen).flatten()
    val_idx = val_idx[torch.randperm(len(val_idx), generator=g)[:args.n_val]].sort().values
    val = train_ds.subset(val_idx) if len(val_idx) else None
    diffusion = Diffusion(cfg["T"], device=dist.device)
    ts = sorted(set(args.t))
    if any(t < 0 or t >= diffusion.T for t in ts):
        raise UserError(f"--t values must lie in [0, {diffusion.T - 1}]")
    t0 = time.time()
    errs = dc0_sweep(model, space, test, test_idx, diffusion, ts, args.n_noise, args.seed, dist, args.batch_size, args.max_batch)  # (T, N, K)
    seconds = time.time() - t0
    y = test.labels.to(dist.device)

    def scores(pred, target):  # accuracy, macro-F1 and, for two classes, the positive class's F1 (the paper's F1)
        acc, macro, cm = accuracy_f1(pred, target, K)
        return {"accuracy": acc, "macro_f1": macro, **({"f1": binary_f1(cm, args.positive_class)} if K == 2 else {})}, cm
    per_t = [scores(errs[i].argmin(1), y)[0] for i in range(len(ts))]
    val_acc = None
    if val is not None:
        verrs = dc0_sweep(model, space, val, val_idx, diffusion, ts, args.n_noise, args.seed + 1, dist, args.batch_size, args.max_batch)
        val_acc = [accuracy_f1(verrs[i].argmin(1), val.labels, K)[0] for i in range(len(ts))]
    score = val_acc or [m["accuracy"] for m in per_t]
    bi = max(range(len(ts)), key=lambda i: (score[i], -ts[i]))
    best, cm = scores(errs[bi].argmin(1), y)
    acc, f1 = best["accuracy"], best["macro_f1"]
    metrics = {**best, "best_t": ts[bi], "best_t_chosen_on": "val" if val is not None else "test",
               "chance": 1.0 / K, "n_test": len(test), "n_val": len(val_idx), "n_noise": args.n_noise, "t": ts,
               **({"positive_class": args.positive_class} if K == 2 else {}),
               **{f"{key}_per_t": {str(t): m[key] for t, m in zip(ts, per_t)} for key in best},
               "val_accuracy_per_t": {str(t): a for t, a in zip(ts, val_acc)} if val_acc else {},
               "val_indices": val_idx.tolist(), "val_excludes_tune_set": bool(len(tuned_on)) or not same_split,
               "test_indices": test_idx.tolist(), "nfe_per_image": K * args.n_noise * len(ts), "img_s": len(test) / seconds}
    if dist.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        RunLog(args.out_dir, dist, dict(stage="classify", ckpt=args.ckpt, args=vars(args))).metrics(metrics)
        classes = cfg.get("classes") or [str(k) for k in range(K)]
        save_heatmap(cm.numpy(), os.path.join(args.out_dir, "confusion.png"), classes, classes,
                     title=f"DC0 confusion at t={ts[bi]} (rows: true)", fmt="{:.0f}")
        curves = {"test accuracy": [m["accuracy"] for m in per_t], "test macro-F1": [m["macro_f1"] for m in per_t]}
        if val_acc:
            curves["val accuracy"] = val_acc
        save_curve(ts, curves, os.path.join(args.out_dir, "sweep.png"), "t", "score", "Diffusion Classifier Zero: timestep sweep")
        print(f"DC0 accuracy {acc:.4f} macro-F1 {f1:.4f}" + (f" F1 (class {args.positive_class}) {best['f1']:.4f}" if K == 2 else "")
              + f" at t={ts[bi]} (chance {1 / K:.4f}); per t: " + ", ".join(f"{t}:{m['accuracy']:.3f}" for t, m in zip(ts, per_t)))
    return metrics


@torch.no_grad()
def encoder_features(model, space, ds, device, batch_size=256):
    feats = []
    for x, _, _ in data.iterate(ds, batch_size, device):
        feats.append(model.encoder(space.encode(x, generator=False))[1].float())
    return torch.cat(feats)


def probe(args):
    """Linear probe on the pre-trained encoder's pooled r: the self-supervised baseline for DC0."""
    dist = setup_distributed(args.device, args.amp)
    model, cfg, ds, space = load_run(args.ckpt, dist.device, args.vae_path, args.data, kinds=("dit",))
    if model.encoder is None:
        raise UserError(f"--ckpt {args.ckpt}: probe needs a checkpoint with an encoder (a `pretrain --cond rep` run)")
    labeled = data.labeled_subset(ds, labels_per_class=args.labels_per_class, fraction=args.labeled_fraction, seed=args.seed)
    test = data.load(test_split_spec(args, cfg), "test", cfg.get("image_size"))
    ftr, fte = encoder_features(model, space, labeled, dist.device), encoder_features(model, space, test, dist.device)
    acc = linear_probe(ftr, labeled.labels.to(dist.device), fte, test.labels.to(dist.device), len(ds.classes))
    metrics = {"probe_accuracy": acc, "n_labeled": len(labeled), "chance": 1 / len(ds.classes)}
    if dist.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        RunLog(args.out_dir, dist, dict(stage="probe", ckpt=args.ckpt, args=vars(args))).metrics(metrics)
        print(f"linear probe on r: {acc:.4f} (chance {1 / len(ds.classes):.4f})")
    return metrics


def load_for_sampling(args, dist):
    """--ckpt: a run of this file, or an official DiT release file (DiT-XL-2-256x256.pt: ImageNet latents, its classes
    named by imagenet1k_classes.tsv; needs --data for the latent space and --vae-path to decode) -> model, cfg, train, space."""
    return load_run(args.ckpt, dist.device, args.vae_path, args.data, kinds=("dit",), official_dit=True, amp=args.amp)


def sample(args):
    """DDPM/DDIM samples conditioned on labels (CFG), on real images' representations, or unconditional; FID.

    FID's reference set is the train split (`--fid-ref`; the papers' convention). A representation-conditioned model
    is conditioned on the reference images' own r (and decode map): its score is a reconstruction FID, `fid_recon`."""
    dist = setup_distributed(args.device, args.amp)
    model, cfg, train, space = load_for_sampling(args, dist)
    diffusion = Diffusion(cfg["T"], device=dist.device)
    ref = train if args.fid_ref == "train" else data.load(test_split_spec(args, cfg), "test", cfg.get("image_size"))
    n = args.n_fid if args.fid else args.n_images
    g = torch.Generator(device=dist.device).manual_seed(args.seed)
    den, enc = model.denoiser, model.encoder
    # guidance on the first 3 latent channels reproduces the official DiT's sample.py; this project's runs guide all
    guided = args.cfg_channels if args.cfg_channels is not None else 3 if cfg.get("official") else None

    def z_of(ds, rows):  # clean z0 of data rows (N,): data.iterate's batch (images, or latents' mean x scale), encoded
        x, _, _ = next(data.iterate(ds.subset(rows), len(rows), dist.device))
        return space.encode(x, generator=False).float()

    samples = []
    for s in range(0, n, args.batch_size):
        b = min(args.batch_size, n - s)
        shape = (b, *space.sample_shape)
        if den.num_classes > 0:
            y = torch.arange(s, s + b, device=dist.device) % den.num_classes
            eps_fn = (lambda x, t: den.forward_with_cfg(x, t, y, args.cfg_scale, guided)[:, :x.shape[1]]) if args.cfg_scale != 1 else \
                     (lambda x, t: den(x, t, y=y)[:, :x.shape[1]])
        elif enc is not None:  # condition on the representations of the reference images
            tokens, r = enc(z_of(ref, torch.arange(s, s + b) % len(ref)))
            m = enc.decode(tokens) if model.inject in ("both", "input") else None
            r = None if model.inject == "input" else r
            eps_fn = (lambda x, t: den(x, t, r=r, x_map=m)[:, :x.shape[1]])
        else:
            eps_fn = (lambda x, t: den(x, t)[:, :x.shape[1]])
        with autocast(resolve_amp(args.amp, dist.device), dist.device):
            z = sample_loop(eps_fn, shape, diffusion, args.sample_steps or diffusion.T, args.sampler, dist.device, g,
                            clip=1.0 if space.kind == "pixel" else None)
        samples.append(z.float())
    z = torch.cat(samples)
    images = space.decode(z)
    metrics = {"n": n, "sampler": args.sampler, "sample_steps": args.sample_steps or diffusion.T, "cfg_scale": args.cfg_scale,
               "cfg_channels": guided or space.sample_shape[0]}
    os.makedirs(args.out_dir, exist_ok=True)
    if images is None:
        save_safetensors({"samples": z}, os.path.join(args.out_dir, "samples.safetensors"))
        print("latent samples saved; pass --vae-path to decode them to images")
    else:
        if dist.is_main:
            classes = cfg.get("classes") or [str(k) for k in range(den.num_classes)]
            captions = [classes[k % den.num_classes] for k in range(min(64, n))] if den.num_classes > 0 else \
                [f"r of {args.fid_ref} {k % len(ref)}" for k in range(min(64, n))] if enc is not None else None
            save_image_grid(images[:64], os.path.join(args.out_dir, "samples.png"), captions=captions)
        if args.fid:
            rows = torch.arange(min(n, len(ref)))
            real = ref.images[rows] if ref.images is not None else data.to_uint8(space.decode(z_of(ref, rows)))
            key = "fid_recon" if enc is not None else "fid"  # conditioned on the reference images themselves: a reconstruction score
            metrics[key] = compute_fid(real, data.to_uint8(images), args.out_dir, dist.device, dist=dist,
                                       inception_path=args.inception_path)
            metrics.update(fid_n_generated=len(images), fid_n_reference=len(real), fid_reference=f"{args.fid_ref} split",
                           **({"fid_conditioning": f"r{' and decode map' if model.inject == 'both' else ''} of the {len(real)} "
                                                   f"reference images"} if enc is not None else {}))
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
# while 1000 pretrain + 1000 tune gave 0.34. So the tune gets the larger share of the budget. The other lever is the
# expectation over eps in argmin_c E||z0 - z0'(c)||^2: DC0 is noisy at a few draws (on the real `digits`, 12000 tune
# steps: 2 / 16 / 64 draws gave 0.358 / 0.544 / 0.569), and draws cost only inference, so classify averages 8; and the
# best t moves with the data (shapes 50-100, digits 300-500), so the sweep spans both.


def pipeline(args):
    """python repcond_dit.py --out-dir D: the whole method on `shapes`, plus the unconditional baseline."""
    out, size = args.out_dir, args.image_size or 16
    common = ["--data", args.data, "--device", args.device, "--seed", str(args.seed)]
    # a few hundred steps: an EMA of decay 0.9999 from step 0 (the official DiT recipe) would still be the initial
    # weights, so the short runs warm the EMA up, and clip gradients at the high learning rate
    train = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--log-every", "100", "--ema-warmup", "--grad-clip", "1.0",
             *(["--overwrite"] if args.overwrite else [])]
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


def main(args):
    stages = {"pretrain": pretrain, "tune": tune, "classify": classify, "probe": probe, "sample": sample, None: pipeline}
    if args.cmd is not None:
        check_out_dir(args)
    try:
        return stages[args.cmd](args)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run(main, build_parser())
