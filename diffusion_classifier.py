"""
Diffusion Classifier: ELBO classification with any class-conditional denoiser, made fast and calibrated.

Paper: "Your Diffusion Model is Secretly a Zero-Shot Classifier" (Li et al., ICCV 2023, arXiv 2303.16203).
A class-conditional eps-predictor gives, for every class c, a Monte-Carlo estimate
of the (weighted) ELBO of log p(x | c) up to a constant,

    err(x, c) = 1/M sum_j w(t_j) loss(eps_j, eps_theta(x_{t_j}, t_j, c)),   x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,

and predicts argmin_c err(x, c) (Bayes' rule with a uniform prior). The (t_j, eps_j) pairs are the same
for every class (paired noise: the differences between classes have far less variance than the
errors), t_j lies on the stratified grid range(T//M//2, T, T//M), and the paper's adaptive schedule
(--n-samples 50 500 --to-keep 5 1) keeps the best classes after each stage, reusing the errors already
computed. Diffusion Classifier Zero (one timestep, x0 error) is the case --t 500 --target x0.
Beyond the paper: a sequential paired t-test that drops a class as soon as it is significantly worse than
the leader, a timestep schedule chosen on a validation split (--schedule auto), and calibrated
probabilities softmax(-err / tau) with tau fitted on that split.

    python diffusion_classifier.py --out-dir runs/dc     # train a small DiT on `shapes` + classify, CPU, minutes
    python diffusion_classifier.py train --data latents_train.safetensors --model DiT-B/2 --out-dir runs/dit
    python diffusion_classifier.py classify --ckpt runs/dit/ckpt --schedule auto --out-dir runs/dit/cls
    python diffusion_classifier.py classify --ckpt DiT-XL-2-256x256.pt --data imagenet_val_latents.safetensors \\
        --val-data imagenet_train_latents.safetensors --n-samples 25 250 --to-keep 10 1 --seq-alpha 0.05
    torchrun --nproc_per_node=8 diffusion_classifier.py classify ...   # or --shard i/n per machine, then `merge`
    python diffusion_classifier.py classify --sd-path stable-diffusion-2-base --data pets/ --prompts prompts/pets_prompts.csv
    python diffusion_classifier.py score --sd-path v1-5-pruned-emaonly.safetensors --tokenizer clip-vit-large-patch14/ \\
        --data pairs/ --texts captions.txt

Denoisers: this file's `train` checkpoints, repcond_dit.py `tune` checkpoints, official DiT files
(DiT-XL-2-256x256.pt, 512: the first 4 output channels are eps) and ddae_probe.py UNets trained
class-conditionally; and Stable Diffusion 1.x / 2.x zero-shot (--sd-path with --prompts: each class's prompts
condition sd.py's UNet; docs/sd.md). Runs are resumable and shardable: per-image results are appended to
OUT_DIR/results/shard-*.jsonl, and `merge` (run automatically when every shard is done) writes
metrics.json and confusion.png.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache, partial

from cli import add_common_args, add_train_args, answer_early, DiT_models, DIT_RECIPE, HelpFormatter, run


# ----------------------------------------------------------------------------------------------
# The command line: first, and standard library only, so that --help answers before torch loads


# The official runs (the Diffusion Classifier release's commands.md), each flag as it ran there: Stable Diffusion zero-shot
# (fp16, one noise draw per timestep) and DiT-XL/2 ImageNet (every class at 250 timesteps, fp32). --protocol NAME sets
# them; a flag given with another value is refused rather than mixed in. Calibration is not part of them (--n-val 0).
_SD = dict(schedule="paper", amp="fp16", n_noise=1, target="eps", weighting="uniform", seq_alpha=0.0, n_val=0, t=None)


PROTOCOLS = {
    "sd-cifar10": dict(_SD, n_samples=[50, 500], to_keep=[5, 1], loss="l1"),
    "sd-stl10": dict(_SD, n_samples=[100, 500], to_keep=[5, 1], loss="l1"),
    "sd-pets": dict(_SD, n_samples=[25, 250], to_keep=[5, 1], loss="l1"),
    "sd-flowers": dict(_SD, n_samples=[20, 50, 100, 500], to_keep=[20, 10, 5, 1], loss="l1"),
    "sd-food": dict(_SD, n_samples=[20, 50, 100, 500], to_keep=[20, 10, 5, 1], loss="l2"),
    "sd-aircraft": dict(_SD, n_samples=[20, 50, 100, 500], to_keep=[20, 10, 5, 1], loss="l2"),
    "sd-imagenet": dict(_SD, n_samples=[50, 100, 500, 1000], to_keep=[500, 50, 10, 1], loss="l2"),
    "sd-objectnet": dict(_SD, n_samples=[50, 100, 500, 1000], to_keep=[25, 10, 5, 1], loss="l2"),
    "dit-imagenet": dict(schedule="full", amp="none", n_noise=1, target="eps", weighting="uniform", seq_alpha=0.0, n_val=0,
                         t=None, n_samples=[250], to_keep=[1], loss="l2"),
}


def add_sd_args(q, required=False):
    q.add_argument("--sd-path", default=None, required=required,
                   help="Stable Diffusion 1.x/2.x: a diffusers folder (stable-diffusion-2-base/) or an LDM single file "
                        "(v1-5-pruned-emaonly.safetensors); classifies zero-shot through --prompts")
    q.add_argument("--prompts", nargs="+", default=None,
                   help="with --sd-path: a prompts .csv (prompt,classname,classidx; several rows per class are averaged) or "
                        "templates filled with the data's class names ('a photo of a {}.'; several are averaged)")
    q.add_argument("--tokenizer", default=None,
                   help="CLIP's vocab.json + merges.txt folder or bpe_simple_vocab_16e6.txt.gz (default: the SD folder's tokenizer/, "
                        "or one beside a single file)")
    q.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="override the model's (needed for SD 2.x single files: 512-px base models eps, 768-px models v)")


def add_classify_args(q):
    add_common_args(q, "runs/dc/classify", test=False)
    q.add_argument("--ckpt", default=None, help="checkpoint folder (train / repcond_dit.py tune / ddae_probe.py) or official DiT .pt")
    add_sd_args(q)
    q.set_defaults(data=None)
    q.add_argument("--split", default="test", help="split of --data to classify")
    q.add_argument("--n-test", type=int, default=0, help="classify a random subset of this many images (0: all)")
    q.add_argument("--classes", type=int, nargs="+", default=None, help="candidate class indices (default: all)")
    q.add_argument("--n-samples", type=int, nargs="+", default=None,
                   help="cumulative (t, eps) samples per stage; the largest is the grid size M (default 50 500)")
    q.add_argument("--to-keep", type=int, nargs="+", default=None, help="classes kept after each stage (default 5 1)")
    q.add_argument("--t", type=int, nargs="+", default=None, help="explicit timesteps instead of the stratified grid (DC0: --t 500 --target x0)")
    q.add_argument("--n-noise", type=int, default=1, help="noise draws per timestep (each its own slot; the official n_trials)")
    q.add_argument("--schedule", default="paper", choices=["paper", "full", "auto"],
                   help="paper: --n-samples/--to-keep (+ --seq-alpha); full: every slot for every class; auto: chosen on --n-val images")
    q.add_argument("--seq-alpha", type=float, default=0.0, help="sequential paired t-test level (0: off)")
    q.add_argument("--seq-every", type=int, default=1, help="slots between two looks of the sequential test")
    q.add_argument("--seq-min-n", type=int, default=3, help="slots before the first look of the sequential test")
    q.add_argument("--auto-budget", type=float, default=0.25,
                   help="--schedule auto: the most passes per image, as a fraction of the exhaustive schedule's")
    q.add_argument("--loss", default="l2", choices=["l2", "l1", "huber"])
    q.add_argument("--target", default="eps", choices=["eps", "x0"], help="error on eps (ELBO) or on the predicted x0 (DC0)")
    q.add_argument("--weighting", default="uniform", choices=["uniform", "elbo"], help="per-timestep weights of the errors")
    q.add_argument("--n-val", type=int, default=None,
                   help="validation images for tau and --schedule auto (0: no calibration; default 200, 0 with --sd-path)")
    q.add_argument("--val-data", default=None, help="validation data (default: held-out train images of the checkpoint, else the train split)")
    q.add_argument("--val-full", action="store_true", help="compute every validation error even for a given schedule (enables reuse)")
    q.add_argument("--calibration", default=None, help="reuse a calibration.json (and its val_errors) of an earlier run")
    q.add_argument("--tau", type=float, default=None, help="fixed temperature instead of fitting it")
    q.add_argument("--shard", default="0/1", help="i/n: classify every n-th image from the i-th (times torchrun ranks)")
    q.add_argument("--batch-size", type=int, default=32, help="images per batch (each appended to the results when done)")
    q.add_argument("--max-batch", type=int, default=None,
                   help="denoiser passes per forward (images x classes x timesteps; default 1024, 32 with --sd-path)")
    q.add_argument("--save-errors", action="store_true", help="also store every (class, slot) error per image")
    q.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="an official run's flags exactly (README); unset: the flags as given (their defaults: the SD CIFAR-10 "
                        "schedule 50/500 keep 5/1, with the l2 error of the paper's ELBO where the release's command uses l1)")
    q.add_argument("--noise-path", default=None, help="a noise tensor (N, C, H, W) shared by every image, as the official "
                                                     "--noise_path (rows in evaluation order); default: each image its own")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_args(p, "runs/dc")
    p.set_defaults(device="cpu", image_size=16)  # 16 px: the CPU budget of the bare run
    p.add_argument("--model", default="DiT-XS/4", choices=sorted(DiT_models))
    p.add_argument("--steps", type=int, default=2000, help="pipeline: training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--n-val", type=int, default=200, help="pipeline: held-out training images (calibration, auto schedule)")
    p.add_argument("--n-test", type=int, default=300, help="pipeline: test images classified")
    p.add_argument("--n-samples", type=int, nargs="+", default=[16], help="pipeline: --n-samples of classify (the largest: the grid size M)")
    p.add_argument("--loss", default="l2", choices=["l2", "l1", "huber"])
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser = partial(sub.add_parser, formatter_class=HelpFormatter)

    q = sub.add_parser("train", help="train a class-conditional DiT (classifier-free label dropout)")
    add_common_args(q, "runs/dc/train")
    add_train_args(q, steps=400_000, batch_size=256, lr=1e-4, **DIT_RECIPE)
    q.add_argument("--model", default="DiT-B/2", choices=sorted(DiT_models))
    q.add_argument("--T", type=int, default=1000)
    q.add_argument("--class-dropout", type=float, default=0.1, help="label dropout (the null label, for guidance)")
    q.add_argument("--n-val", type=int, default=500, help="train images held out for calibration (their indices go in config.json)")
    q.add_argument("--no-augment", action="store_true")

    q = sub.add_parser("classify", help="ELBO classification of a data set (resumable, shardable)")
    add_classify_args(q)

    q = sub.add_parser("score", help="Stable Diffusion: error matrix of images x texts (image-text matching), JSON + heatmap")
    add_common_args(q, "runs/dc/score", test=False)
    q.set_defaults(data=None)
    add_sd_args(q, required=True)
    q.add_argument("--texts", nargs="+", required=True, help="a .txt file (one text per line) or the texts")
    q.add_argument("--split", default="test", help="split of --data to score")
    q.add_argument("--n-images", type=int, default=0, help="score a random subset of this many images (0: all)")
    q.add_argument("--n-samples", type=int, default=100, help="slots (t, eps) of the stratified grid, the same for every text")
    q.add_argument("--loss", default="l2", choices=["l2", "l1", "huber"])
    q.add_argument("--batch-size", type=int, default=8, help="images per batch")
    q.add_argument("--max-batch", type=int, default=32, help="UNet passes per forward")

    q = sub.add_parser("merge", help="merge the shards of a classify run into metrics.json")
    q.add_argument("--out-dir", required=True)

    q = sub.add_parser("bench", help="img/s: batched (+ bf16 + compile) vs one class at a time, random-weight DiT")
    add_common_args(q, "runs/dc/bench", test=False)
    q.add_argument("--model", default="DiT-B/2", choices=sorted(DiT_models))
    q.add_argument("--latent-shape", type=int, nargs=2, default=[4, 32], help="channels, size")
    q.add_argument("--num-classes", type=int, default=1000)
    q.add_argument("--bench-classes", type=int, default=10, help="candidate classes per image")
    q.add_argument("--n-samples", type=int, default=25)
    q.add_argument("--n-images", type=int, default=32)
    q.add_argument("--batch-size", type=int, default=16, help="images per batch")
    q.add_argument("--max-batch", type=int, default=1024)
    return p


if __name__ == "__main__":
    answer_early(build_parser())  # --help, or a line argparse refuses, answered before the imports below

# the method's imports (torch takes about 2 s)
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import data
from data import UserError
from training import (accuracy_f1, autocast, check_out_dir, cleanup_distributed, compile_default, find_checkpoint, fit,
                      load_json, load_torch, load_weights, Progress, resolve_amp, RunLog, save_curve, save_heatmap,
                      save_json, save_safetensors, setup_distributed, transformer_flops_per_image)
from models import build_model, Diffusion, diffusion_loss, DiT, load_dit, UNet
from vae import Space


# ----------------------------------------------------------------------------------------------
# Denoisers: one small interface, eps(x_t, t, y) -> eps_hat


class Denoiser(nn.Module):
    """A class-conditional eps-predictor behind one call: forward(x_t, t, y) -> eps_hat (N, C, H, W).

    net(x_t, t, y) may return more channels than x_t has (the official DiT learns the variance too:
    channels 0..C-1 are eps, C..2C-1 the variance interpolant); only the first C are used.
    """
    def __init__(self, net, num_classes, sample_shape, T=1000, classes=None, kind="dit"):
        super().__init__()
        self.net, self.num_classes, self.sample_shape, self.T, self.kind = net, num_classes, tuple(sample_shape), T, kind
        self.named = bool(classes)  # without names, data labels are taken as the model's class indices
        self.classes = list(classes) if classes else [str(k) for k in range(num_classes)]

    def forward(self, x_t, t, y):
        return self.net(x_t, t, y)[:, :x_t.shape[1]]  # (N, C, H, W)


def _ddae_unet(d, cfg, device):
    """ddae_probe.py's UNet pretrained with --class-cond (DDPM objective: forward(x, t, y) predicts eps)."""
    if cfg.get("objective", "ddpm") != "ddpm":
        raise UserError(f"{d}: only --objective ddpm UNets (eps-prediction) classify here, not {cfg.get('objective')!r}")
    if cfg.get("num_classes", 0) <= 0:
        raise UserError(f"{d}: this UNet is unconditional; pretrain it with --class-cond to classify with it")
    net = load_weights(d, UNet(**cfg["unet"]))
    den = Denoiser(net, cfg["num_classes"], cfg["sample_shape"], cfg.get("T", 1000), cfg.get("classes"), kind="ddae-unet")
    den.betas = tuple(cfg.get("beta_range", (1e-4, 0.02)))
    if torch.device(device).type == "cuda":
        den = den.to(memory_format=torch.channels_last)
    return den.to(device).eval(), cfg


def load_denoiser(ckpt, device="cpu"):
    """--ckpt -> (Denoiser, config dict). A file is an official DiT checkpoint (raw state dict, or a training
    checkpoint's "ema"); a folder is a checkpoint of this file's `train`, of repcond_dit.py `tune`, or of
    ddae_probe.py (config.json names the model)."""
    if ckpt is None:
        raise UserError("--ckpt is required: a checkpoint folder or an official DiT .pt file")
    if os.path.isfile(ckpt):
        dit = load_dit(ckpt, "cpu")
        if dit.num_classes <= 0:
            raise UserError(f"--ckpt {ckpt}: this DiT has no label embedder; classification needs a class-conditional model")
        imagenet = [w for w, _ in data.imagenet_classes()] if dit.num_classes == 1000 else None  # the official DiTs' classes
        den = Denoiser(dit, dit.num_classes, (dit.in_channels, dit.input_size, dit.input_size), 1000, imagenet, kind="dit-official")
        return den.to(device).eval(), {"kind": "dit-official", "T": 1000}
    if not os.path.isdir(ckpt):
        raise UserError(f"--ckpt {ckpt}: no such file or folder")
    d = find_checkpoint(ckpt)
    cfg = load_json(os.path.join(d, "config.json"))
    if cfg.get("arch") == "unet":
        return _ddae_unet(d, cfg, device)
    if cfg.get("model") not in DiT_models or "sample_shape" not in cfg:
        raise UserError(f"{d}/config.json: not a DiT checkpoint of this project (no known 'model' / 'sample_shape')")
    if cfg.get("num_classes", 0) <= 0 or cfg.get("cond") == "rep":
        raise UserError(f"--ckpt {ckpt}: not class-conditional (cond={cfg.get('cond')!r}); "
                        "use this file's `train` or `repcond_dit.py tune` first")
    model = load_weights(d, build_model(cfg))
    den = Denoiser(model.denoiser, cfg["num_classes"], cfg["sample_shape"], cfg.get("T", 1000), cfg.get("classes"), kind=cfg.get("stage", "dit"))
    return den.to(device).eval(), cfg


# ----------------------------------------------------------------------------------------------
# Stable Diffusion: a text-conditional denoiser made class-conditional by prompts (the paper's zero-shot setting)


def read_prompts(spec):
    """--prompts -> [(prompt, class index or None, class name or None)].

    A .csv file as the official code's prompts/*.csv: a header with `prompt` and `classidx` (and `classname`), one
    row per prompt; several rows of one class are averaged (prompt ensembling). Otherwise each value is a template
    with "{}" that the data set's class names fill ("a photo of a {}."); several templates are averaged."""
    import csv
    if len(spec) == 1 and spec[0].lower().endswith(".csv"):
        path = spec[0]
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise UserError(f"--prompts {path}: unreadable ({e.strerror or e})")
        if not rows or not {"prompt", "classidx"} <= set(rows[0]):
            raise UserError(f"--prompts {path}: expected a CSV with a header naming the columns prompt, classidx (and classname)")
        try:
            return [(r["prompt"], int(r["classidx"]), r.get("classname")) for r in rows]
        except (TypeError, ValueError):
            raise UserError(f"--prompts {path}: classidx must be an integer in every row")
    bad = [s for s in spec if s.count("{}") != 1]
    if bad:
        raise UserError(f"--prompts {bad[0]!r}: expected a .csv file or templates with one '{{}}' for the class name")
    return [(s, None, None) for s in spec]


class SDDenoiser(Denoiser):
    """Stable Diffusion as a class-conditional eps-predictor over its prompts: forward(x_t, t, p) runs the UNet with
    prompt p's text embedding (computed once, in set_classes). `groups[c]` lists the prompts of class c.
    A v-prediction model's output is converted to eps (sd.StableDiffusion.eps)."""

    def __init__(self, pipe, prompts, image_size):
        nn.Module.__init__(self)
        self.pipe, self.vae, self.T, self.kind, self.named = pipe, pipe.vae, len(pipe.alphas_cumprod), "sd", True
        f = pipe.vae.downsample_factor
        if image_size % f:
            raise UserError(f"--image-size {image_size}: not a multiple of the VAE's downsampling factor {f}")
        self.sample_shape = (pipe.vae.latent_channels, image_size // f, image_size // f)
        self.spec = prompts
        self.classes = None
        if prompts[0][1] is not None:  # a CSV names its classes
            K = 1 + max(c for _, c, _ in prompts)
            names = {c: n for _, c, n in prompts}
            self.set_classes([names.get(k) or str(k) for k in range(K)])

    def set_classes(self, classes):
        """Fill the templates with the class names (underscores as spaces) and encode every prompt once."""
        if self.spec[0][1] is None:
            self.prompts = [t.replace("{}", c.replace("_", " ")) for c in classes for t, _, _ in self.spec]
            per = len(self.spec)
            self.groups = [list(range(k * per, (k + 1) * per)) for k in range(len(classes))]
        else:
            self.prompts = [p for p, _, _ in self.spec]
            self.groups = [[i for i, (_, c, _) in enumerate(self.spec) if c == k] for k in range(len(classes))]
            empty = [k for k, g in enumerate(self.groups) if not g]
            if empty:
                raise UserError(f"--prompts: no prompt for class index {empty[0]} (indices must run 0..{len(classes) - 1})")
        self.classes, self.num_classes = list(classes), len(classes)
        self.register_buffer("context", self.pipe.encode_text(self.prompts), persistent=False)  # (P, 77, D)

    def forward(self, x_t, t, p):
        return self.pipe.eps(x_t, t, self.context[p])  # (N, 4, h, w)


class PromptErrors:
    """ErrorFn over classes from ErrorFn over prompts: the error of (image, class, slot) is the mean over the class's
    prompts, each at the same (t, eps) (paired); with one prompt per class it is a re-indexing."""

    def __init__(self, err_fn, groups):
        self.err_fn = err_fn
        dev = err_fn.slot_t.device
        self.count = torch.tensor([len(g) for g in groups], device=dev)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.flat = torch.tensor([p for g in groups for p in g], device=dev)

    @property
    def passes(self):
        return self.err_fn.passes

    def bind(self, z0, noise):
        self.err_fn.bind(z0, noise)
        return self

    def __call__(self, b, c, j):
        n = self.count[c]  # prompts of each request's class
        r = torch.arange(len(c), device=c.device).repeat_interleave(n)  # request of each (request, prompt) pair
        k = torch.arange(len(r), device=c.device) - (torch.cumsum(n, 0) - n).repeat_interleave(n)  # prompt within the class
        e = self.err_fn(b[r], self.flat[self.start[c][r] + k], j[r])
        return torch.zeros(len(c), device=e.device).index_add_(0, r, e) / n


class TableDiffusion(Diffusion):
    """A Diffusion whose abar comes from a table (SD's scaled-linear schedule, or the file's alphas_cumprod)."""

    def __init__(self, alphas_cumprod, device="cpu"):
        abar = alphas_cumprod.double().cpu()
        self.T = len(abar)
        self.alphas_cumprod = abar.float().to(device)
        self.gamma, self.delta = abar.sqrt().float().to(device), (1 - abar).sqrt().float().to(device)


def load_sd_denoiser(args, device):
    """--sd-path (+ --prompts, --tokenizer, --prediction-type) -> (SDDenoiser, config dict). Images are encoded at
    --image-size (default 512, the paper's) to the VAE's posterior mean x scaling factor."""
    import sd
    if not args.data:
        raise UserError("--data is required with --sd-path: the images to classify (a folder of class folders, or a named set)")
    if not args.prompts:
        raise UserError("--prompts is required with --sd-path: a prompts .csv (prompt, classname, classidx) or a template "
                        "such as 'a photo of a {}.'")
    prompts = read_prompts(args.prompts)
    pipe = sd.load(args.sd_path, device=device, tokenizer=args.tokenizer, prediction_type=args.prediction_type)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
    den = SDDenoiser(pipe, prompts, args.image_size).eval()
    if den.classes is not None and den.num_classes == 1000:  # a 1000-class CSV (the official imagenet_prompts.csv)
        den.classes = [w for w, _ in data.imagenet_classes()]  # indexes ImageNet's classes: match the data by wnid or name
    cfg = {"kind": "sd", "T": den.T, "version": pipe.version, "prediction_type": pipe.prediction_type}
    return den, cfg


def sd_defaults(args):
    """Flags whose defaults differ with --sd-path: 512 px, no calibration images, 32 UNet passes per forward."""
    sd_mode = bool(getattr(args, "sd_path", None))
    if sd_mode and args.image_size is None:
        args.image_size = 512
    if args.n_val is None:
        args.n_val = 0 if sd_mode else 200
    if args.max_batch is None:
        args.max_batch = 32 if sd_mode else 1024
    if not sd_mode and (args.prompts or args.tokenizer or args.prediction_type):
        raise UserError("--prompts, --tokenizer and --prediction-type need --sd-path")
    if sd_mode and args.ckpt:
        raise UserError("--ckpt and --sd-path: classify with one model, not both")


# ----------------------------------------------------------------------------------------------
# The ELBO estimate: timestep slots, paired noise, per-sample error


def timestep_grid(T, n_slots, t=None, n_trials=1):
    """Slot j -> timestep: the official stratified grid range(T//M//2, T, T//M)[:M], or the explicit --t list;
    each timestep repeated n_trials times (each repeat is its own slot with its own noise)."""
    if t:
        if any(x < 0 or x >= T for x in t):
            raise UserError(f"--t values must lie in [0, {T - 1}]")
        ts = list(t)
    else:
        if not 1 <= n_slots <= T:
            raise UserError(f"--n-samples must lie in [1, T={T}], got {n_slots}")
        ts = list(range(T // n_slots // 2, T, T // n_slots))[:n_slots]
    return [x for x in ts for _ in range(n_trials)]


def shared_noise(path, policy, shape):
    """The official code's --noise_path: one noise tensor (N, C, H, W) (its scripts/save_noise.py: torch.manual_seed(42),
    randn(1024, 4, S, S)) shared by every image and class. Row i is the i-th slot in evaluation order, as the official
    code indexes it (eval_prob_dit.py --randomize_noise: slot j of the t grid; eval_prob_adaptive.py: the j-th timestep
    evaluated, times n_trials, plus the trial). -> (M, C, H, W), slot-indexed."""
    noise = load_torch(path, "noise tensor (N, C, H, W)")
    M = len(policy.order)
    if not torch.is_tensor(noise) or noise.dim() != 4 or tuple(noise.shape[1:]) != tuple(shape) or len(noise) < M:
        got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise UserError(f"--noise-path {path}: expected a tensor (N >= {M}, {', '.join(map(str, shape))}), got {got}")
    out = torch.empty(M, *shape)
    out[torch.tensor(policy.order)] = noise[:M].float()
    return out


def _mix(*keys):
    """A well-mixed 63-bit seed from integers (splitmix64 steps): the CPU generator keeps only the low
    32 bits of a seed, so (seed, image) must not be packed into the high bits."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (k & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


def slot_noise(shape, n_slots, seed, stream, index, device):
    """eps for every slot of one image, a pure function of (seed, stream, image index): the same eps is
    used for every class (paired), and a resumed or sharded run draws exactly the same noise."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, stream, index))
    return torch.randn((n_slots, *shape), generator=g, device=device)  # (M, C, H, W)


def sample_error(pred, target, loss):
    """Per-sample error: mean over (C, H, W) of the elementwise l2 / l1 / huber loss, as the official code."""
    pred, target = pred.float(), target.float()
    if loss == "l2":
        e = (pred - target).pow(2)
    elif loss == "l1":
        e = (pred - target).abs()
    else:
        e = F.huber_loss(pred, target, reduction="none", delta=1.0)
    return e.flatten(1).mean(1)  # (N,)


def elbo_weights(diffusion, target="eps"):
    """The ELBO's weight of each timestep's error, normalised to mean 1 over t (argmin is scale-free).

    eps error: w_t = beta_t / (2 alpha_t (1 - abar_{t-1})) = (SNR(t-1) / SNR(t) - 1) / 2; x0 error:
    w_t = (SNR(t-1) - SNR(t)) / 2 (Ho et al. 2020, Kingma et al. 2021). The t = 0 term is a decoder
    likelihood in DDPM, not an eps error; we give it the weight of t = 1.
    """
    abar = diffusion.alphas_cumprod.double()
    snr = abar / (1 - abar)
    if target == "eps":
        w = 0.5 * (snr[:-1] / snr[1:] - 1)
    else:
        w = 0.5 * (snr[:-1] - snr[1:])
    w = torch.cat([w[:1], w])  # (T,)
    return (w / w.mean()).float()


@torch.no_grad()
def algorithm1(den, diffusion, z0, grid, noise, n_samples, to_keep, candidates, loss="l2"):
    """Diffusion Classifier for one image as plain loops: the paper's Algorithm 1 with the adaptive schedule of the
    official eval_prob_adaptive.py. Stage s draws its n_samples[s] timesteps from the grid (those not seen yet),
    computes every surviving class's error at each of them with the same eps (paired), then keeps the to_keep[s]
    classes of lowest mean error; the last one left is the prediction.

    z0: (C, H, W) clean sample; grid: M slot timesteps (timestep_grid); noise: (M, C, H, W), eps of each slot;
    candidates: class indices. -> (predicted class, {class: (M,) errors, NaN where not evaluated}).
    This is the reference the fast path (ErrorFn + run_policy + paper_policy: every image, class and timestep
    in one batched forward) is tested against, and bench's baseline; it costs one forward per (class, stage)."""
    M = len(grid)
    alive, seen = list(candidates), []
    errors = {c: torch.full((M,), float("nan")) for c in alive}
    for n, keep in zip(n_samples, to_keep):
        slots = [j for j in list(range(M))[M // n // 2::M // n][:n] if j not in seen]
        seen += slots
        t = torch.tensor([grid[j] for j in slots], device=z0.device)  # (S,)
        eps = noise[slots]  # (S, C, H, W)
        abar = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps  # x_t ~ q(x_t | x_0), the same eps for every class
        for c in alive:
            eps_hat = den(x_t, t, torch.full_like(t, c))  # (S, C, H, W)
            errors[c][slots] = sample_error(eps_hat, eps, loss).cpu()  # ||eps - eps_theta(x_t, t, c)||^2 per t
        alive = sorted(alive, key=lambda c: errors[c][seen].mean().item())[:keep]
    return alive[0], errors


class ErrorFn:
    """Errors for a flat list of requests (image b, class c, slot j) of the bound batch of images.

    All requests go through the denoiser in chunks of max_batch, mixing images, classes and timesteps in
    one forward. With compile, chunks are padded to a few bucket sizes so the graph is compiled once per
    bucket, not per length. `passes` counts denoiser evaluations (the NFE).
    """
    def __init__(self, den, diffusion, slot_t, loss="l2", target="eps", weighting="uniform", max_batch=1024,
                 amp="none", compile=False):
        self.den, self.diffusion, self.loss, self.target = den, diffusion, loss, target
        self.net = torch.compile(den, dynamic=False) if compile else den
        self.compiled = compile
        self.slot_t = torch.as_tensor(slot_t, dtype=torch.long, device=diffusion.gamma.device)
        self.w = elbo_weights(diffusion, target).to(diffusion.gamma.device) if weighting == "elbo" else None
        self.max_batch, self.amp, self.passes = max_batch, amp, 0

    def bind(self, z0, noise):
        """z0: (B, C, H, W) clean samples (latents cached once per image); noise: (B, M, C, H, W)."""
        self.z0, self.noise = z0, noise
        return self

    def _bucket(self, n):
        for k in range(6, -1, -1):
            if (self.max_batch >> k) >= n:
                return max(1, self.max_batch >> k)
        return n

    @torch.no_grad()
    def __call__(self, b, c, j):
        out = torch.empty(len(b), device=self.z0.device)
        for s in range(0, len(b), self.max_batch):
            bb, cc, jj = b[s:s + self.max_batch], c[s:s + self.max_batch], j[s:s + self.max_batch]
            t = self.slot_t[jj]
            z0, eps = self.z0[bb], self.noise[bb, jj]  # (n, C, H, W) each
            x_t = self.diffusion.q_sample(z0, t, eps)
            n = len(bb)
            xin, tin, yin = x_t, t, cc
            if self.compiled and self._bucket(n) > n:
                pad = self._bucket(n) - n
                xin = torch.cat([x_t, x_t[:1].expand(pad, *x_t.shape[1:])])
                tin, yin = torch.cat([t, t[:1].expand(pad)]), torch.cat([cc, cc[:1].expand(pad)])
            with autocast(self.amp, x_t.device):
                eps_hat = self.net(xin, tin, yin)
            eps_hat = eps_hat[:n].float()
            if self.target == "x0":  # Diffusion Classifier Zero's error: ||z0 - z0'(c)||
                err = sample_error(self.diffusion.predict_z0(x_t, t, eps_hat), z0, self.loss)
            else:
                err = sample_error(eps_hat, eps, self.loss)
            out[s:s + n] = err * self.w[t] if self.w is not None else err
            self.passes += n
        return out


# ----------------------------------------------------------------------------------------------
# Schedules: which (class, slot) errors to compute, and when to drop classes


@dataclass
class Policy:
    """An evaluation schedule for one image.

    order:  slot indices in evaluation order; len(order) is the budget (slots per surviving class).
    stages: [(n, keep)]: after the first n slots of `order`, keep the `keep` classes of lowest mean error
            (the paper's adaptive schedule); n is cumulative and the last n is len(order).
    alpha:  level of the sequential paired t-test (0: off): every `every` slots from `min_n` on, a class
            is dropped once its errors exceed the leader's significantly (Bonferroni over the other
            classes and over the looks).
    """
    order: list
    stages: list
    alpha: float = 0.0
    every: int = 1
    min_n: int = 3

    def looks(self):
        pts = {n for n, _ in self.stages} | {len(self.order)}
        if self.alpha > 0:
            pts |= set(range(max(2, self.min_n), len(self.order) + 1, self.every))
        return sorted(p for p in pts if 0 < p <= len(self.order))

    def seq_looks(self):
        return [n for n in self.looks() if self.alpha > 0 and n >= max(2, self.min_n)]

    def describe(self, grid):
        s = f"{len(self.order)} slots"
        if len(self.stages) > 1 or self.stages[-1][1] > 1:
            s += ", stages " + " ".join(f"{n}:keep{k}" for n, k in self.stages)
        if self.alpha > 0:
            s += f", seq alpha {self.alpha:g} every {self.every} from {self.min_n}"
        return s + f", t = {[grid[j] for j in self.order][:12]}{' ...' if len(self.order) > 12 else ''}"

    def to_json(self):
        return {**asdict(self), "stages": [list(s) for s in self.stages]}

    @staticmethod
    def from_json(d):
        return Policy(list(d["order"]), [tuple(s) for s in d["stages"]], d.get("alpha", 0.0), d.get("every", 1), d.get("min_n", 3))


def coarse_to_fine(items):
    """Reorder a list so that every prefix is spread over it (bit-reversed positions): a look after a few
    slots sees small, middle and large t rather than only the smallest."""
    n = len(items)
    bits = max(1, (n - 1).bit_length())
    return [items[i] for i in sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))]


def paper_policy(n_slots, n_samples, to_keep, alpha=0.0, every=1, min_n=3, n_trials=1):
    """The official adaptive schedule: stage s evaluates t_to_eval[M//n//2 :: M//n][:n] minus the timesteps
    already done (M = max n_samples timesteps), each with its n_trials noise draws (slots j * n_trials + r, as
    `timestep_grid` lays them out), then keeps the `to_keep` best classes. --n-samples 50 500 --to-keep 5 1
    costs K*50 + 5*450 passes per image."""
    n_t = n_slots // n_trials
    order, stages, done = [], [], set()
    for n, k in zip(n_samples, to_keep):
        if not 1 <= n <= n_t:
            raise UserError(f"--n-samples {n}: must lie in [1, {n_t}] (the grid's timesteps)")
        new = [j for j in list(range(n_t))[n_t // n // 2::n_t // n][:n] if j not in done]
        done.update(new)
        new = [j * n_trials + r for j in new for r in range(n_trials)]
        order += coarse_to_fine(new) if alpha > 0 else new
        stages.append((len(order), k))
    return Policy(order, stages, alpha, every, min_n)


def full_policy(n_slots):
    """Every slot for every class: the exhaustive Monte-Carlo ELBO estimate."""
    return Policy(list(range(n_slots)), [(n_slots, 1)])


def sequential_drop(e, mean, alive, n_cls0, alpha, n_looks):
    """Classes to drop after a look. e: (B, K, n) errors on the n slots seen so far (NaN where not computed).

    Paired t-test of class c against the leader l (lowest mean): d_j = e[c, j] - e[l, j];
    drop c when mean(d) / (sd(d) / sqrt(n)) > t_{1-a}(n - 1), a = alpha / ((K0 - 1) * looks).
    """
    B, K, n = e.shape
    leader = mean.argmin(1)
    d = e - e[torch.arange(B, device=e.device), leader][:, None]  # (B, K, n)
    stat = d.mean(-1) / (d.std(-1) / math.sqrt(n)).clamp_min(1e-12)  # NaN for classes not computed -> never dropped
    k_other, inv = torch.unique((n_cls0 - 1).clamp_min(1), return_inverse=True)  # one level per number of candidates
    crit = torch.tensor([t_quantile(alpha / (k * n_looks), n - 1) for k in k_other.tolist()], device=e.device)[inv]
    drop = alive & (stat > crit[:, None])
    drop[torch.arange(B, device=e.device), leader] = False
    return drop


@torch.no_grad()
def run_policy(err_fn, B, K, M, policy, alive0=None, device="cpu"):
    """Classify B images under a policy. err_fn(b, c, j) -> errors of flat requests (image, class, slot).

    Images move through the looks in lockstep, each with its own surviving classes; an image with one
    class left asks for nothing more. Every surviving class of an image has been evaluated on the same
    slots, so means and tests are always paired. Returns pred (B,), nfe (B,), err (B, K) (mean error over
    the slots each class got; NaN: never evaluated), delta (B, K) (paired mean difference to the
    predicted class over the slots both got: the calibrated logits are -delta / tau) and E (B, K, M).
    """
    E = torch.full((B, K, M), float("nan"), device=device)
    alive = alive0.clone().to(device) if alive0 is not None else torch.ones(B, K, dtype=torch.bool, device=device)
    n_cls0 = alive.sum(1)
    keep, seq = dict(policy.stages), set(policy.seq_looks())
    n_looks = max(1, len(seq))
    order = torch.tensor(policy.order, dtype=torch.long, device=device)
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    prev, inf = 0, torch.tensor(float("inf"), device=device)
    for n in policy.looks():
        slots = order[prev:n]
        active = alive.sum(1) > 1
        bc = (alive & active[:, None]).nonzero()  # (P, 2) surviving (image, class) pairs
        if len(bc) and len(slots):
            b = bc[:, 0].repeat_interleave(len(slots))
            c = bc[:, 1].repeat_interleave(len(slots))
            j = slots.repeat(len(bc))
            E[b, c, j] = err_fn(b, c, j).to(E.dtype)
            nfe += torch.bincount(bc[:, 0], minlength=B) * len(slots)
        prev = n
        e = E[:, :, order[:n]]  # (B, K, n)
        mean = torch.where(alive, e.nanmean(-1).nan_to_num(0.0), inf)
        if n in keep:  # the paper's stage: keep the best `keep` classes
            alive &= mean.argsort(1).argsort(1) < keep[n]
            mean = torch.where(alive, mean, inf)
        if n in seq and bool((alive.sum(1) > 1).any()):
            alive &= ~sequential_drop(e, mean, alive, n_cls0, policy.alpha, n_looks)
            mean = torch.where(alive, mean, inf)
    pred = mean.argmin(1)
    err = E.nanmean(-1)
    delta = (E - E[torch.arange(B, device=device), pred][:, None]).nanmean(-1)
    delta[torch.arange(B, device=device), pred] = 0.0  # also when a lone candidate was never evaluated
    return {"pred": pred, "nfe": nfe, "err": err, "delta": delta, "E": E, "alive": alive}


def simulate(E, policy, alive0=None):
    """Run a policy on a precomputed full error tensor (N, K, M): exactly what a real run with the same
    noise would compute (paired noise is indexed by slot), at no cost."""
    N, K, M = E.shape
    return run_policy(lambda b, c, j: E[b, c, j], N, K, M, policy, alive0, E.device)


def pairwise_accuracy(delta, y):
    """Fraction of (true class, wrong candidate) pairs that a result ranks correctly (the wrong class has the
    larger paired error difference), averaged over images: a smoother, lower-variance cousin of accuracy."""
    d = delta
    dy = d[torch.arange(len(y), device=d.device), y][:, None]
    cand = ~d.isnan()
    right = ((d > dy) & cand).float().sum(1) + 0.5 * ((d == dy) & cand).float().sum(1) - 0.5  # the true class ties itself
    n = cand.float().sum(1) - 1
    ok = ~dy[:, 0].isnan() & (n > 0)
    return (right[ok] / n[ok]).mean().item() if ok.any() else float("nan")


def rank_slots(E, y, alive0=None):
    """Slots ordered by how well each one alone ranks the true class on validation errors E (N, K, M)."""
    M = E.shape[2]
    score = [pairwise_accuracy(simulate(E, Policy([j], [(1, 1)]), alive0)["delta"], y) for j in range(M)]
    return sorted(range(M), key=lambda j: (-score[j], j))


def search_policy(E, y, alive0=None, budget=0.25, grid=None, log=print):
    """--schedule auto: among schedules whose worst case costs at most `budget` x the exhaustive schedule's
    passes, the one with the best validation pairwise accuracy (then accuracy, then fewer passes).

    Candidates use the slots ranked one by one on validation (`rank_slots`: a per-slot statistic, which
    generalises better than a greedy search over slot sets, which over-fits a few hundred images), with
    every budget of 1..M slots, an optional first paper stage (n1 slots, keep k), and the sequential test
    at a few levels. All are simulated on the validation errors E (N, K, M): computing E is the only cost.
    Pairwise accuracy is the criterion because on a few hundred images top-1 accuracy is too noisy to
    rank schedules that differ by a point."""
    N, K, M = E.shape
    Kc = int(alive0[0].sum()) if alive0 is not None else K
    full = simulate(E, full_policy(M), alive0)
    nfe_full = full["nfe"].float().mean().item()
    order = rank_slots(E, y, alive0)
    budget = max(budget, 1.0 / M)  # at least one slot for every class
    budgets = sorted({m for m in (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64, 96, 128, 192, 256, 384, 512) if m < M} | {M})
    cap = budget * Kc * M  # the exhaustive schedule's passes
    best, n = None, 0
    for m in budgets:
        for st in [None] + [(n1, k) for n1 in (1, 2, 4) if n1 < m for k in (2, 3, 5) if k < Kc]:
            if (st[0] * Kc + (m - st[0]) * st[1] if st else m * Kc) > cap + 1e-6:
                continue  # the worst case (no early stop) must fit: then no image ever costs more than the budget
            for alpha in ((0.0, 0.05, 0.5) if m >= 3 else (0.0,)):
                pol = Policy(order[:m], ([st] if st else []) + [(m, 1)], alpha, 1, 3)
                r = simulate(E, pol, alive0)
                n += 1
                key = (pairwise_accuracy(r["delta"], y), (r["pred"] == y).float().mean().item(), -r["nfe"].float().mean().item())
                if best is None or key > best[0]:
                    best = (key, pol)
    if best is None:
        raise UserError(f"--auto-budget {budget}: no schedule is that cheap (one slot for every class costs {Kc} passes "
                        f"of the exhaustive {nfe_full:.0f})")
    (pair, acc, nfe), pol = best
    info = {"val_accuracy": acc, "val_pairwise": pair, "val_nfe": -nfe, "val_accuracy_full": (full["pred"] == y).float().mean().item(),
            "val_pairwise_full": pairwise_accuracy(full["delta"], y), "val_nfe_full": nfe_full, "n_candidates": n,
            "slot_rank": order}
    log(f"schedule auto: {pol.describe(grid or list(range(M)))}: validation accuracy {acc:.4f} (pairwise {pair:.4f}) at "
        f"{-nfe:.1f} passes/image; exhaustive {info['val_accuracy_full']:.4f} (pairwise {info['val_pairwise_full']:.4f}) at {nfe_full:.0f}")
    return pol, info


# ----------------------------------------------------------------------------------------------
# Calibration: softmax(-delta / tau), tau fitted on held-out images


def class_probs(delta, tau):
    """delta (N, K): paired error difference to the predicted class (NaN: class never evaluated) -> probabilities."""
    logits = (-delta / tau).masked_fill(delta.isnan(), float("-inf"))
    return logits.softmax(1)


def nll_ece(probs, y, n_bins=15):
    """Mean NLL of the true class (probabilities clamped at 1e-12) and the expected calibration error of the
    top-1 confidence over n_bins equal-width bins."""
    p_true = probs[torch.arange(len(y)), y].clamp_min(1e-12)
    nll = -p_true.log().mean().item()
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    bins = (conf * n_bins).long().clamp(max=n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        m = bins == k
        if m.any():
            ece += m.float().mean().item() * abs(correct[m].mean().item() - conf[m].mean().item())
    return nll, ece


def fit_tau(delta, y):
    """tau minimising the validation NLL of softmax(-delta / tau): golden-section search over log(1 / tau)
    (the NLL is convex in 1 / tau, hence unimodal in its log)."""
    delta, y = delta.float().cpu(), y.cpu()
    pos = delta[(delta > 0) & delta.isfinite()]
    scale = pos.median().item() if len(pos) else 1.0

    def nll(log_beta):
        return nll_ece(class_probs(delta, math.exp(-log_beta)), y)[0]
    lo, hi = -math.log(scale) - 12, -math.log(scale) + 12
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp(-(lo + hi) / 2)


# ----------------------------------------------------------------------------------------------
# Running over a data set: batches of images, per-image results, shards, resume, merge


def load_z0(ds, idx, space, device):
    """Clean model inputs of ds[idx], encoded once per image (VAE posterior mean, or a latents file's mean)."""
    x, _, _ = next(data.iterate(ds.subset(torch.as_tensor(idx)), len(idx), device))
    return space.encode(x, generator=False).float()


def classify_images(err_fn, space, ds, idx, policy, M, K, seed, stream, batch_size, alive0, device, on_batch=None, keep_E=True,
                    shared_noise=None):
    """Classify ds[idx] batch by batch. Returns per-image tensors (pred, nfe, err, delta, [E]) on the CPU and
    calls on_batch(idx_batch, result, seconds) after each batch (the results file appends there). Each image's slot
    noise is its own (slot_noise), or shared_noise (M, C, H, W) for every image (the official code's --noise_path)."""
    outs = {k: [] for k in ("pred", "nfe", "err", "delta", "E")}
    idx = list(map(int, idx))
    for s in range(0, len(idx), batch_size):
        ib = idx[s:s + batch_size]
        t0 = time.time()
        z0 = load_z0(ds, ib, space, device)
        if shared_noise is not None:
            noise = shared_noise.to(device)[None].expand(len(ib), *shared_noise.shape)  # (B, M, C, H, W)
        else:
            noise = torch.stack([slot_noise(z0.shape[1:], M, seed, stream, i, device) for i in ib])  # (B, M, C, H, W)
        a0 = alive0[None].expand(len(ib), K) if alive0 is not None else None
        r = run_policy(err_fn.bind(z0, noise), len(ib), K, M, policy, a0, device)
        r = {k: v.cpu() for k, v in r.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        if on_batch is not None:
            on_batch(ib, r, time.time() - t0)
        for k in outs:
            if k != "E" or keep_E:
                outs[k].append(r[k])
    return {k: torch.cat(v) for k, v in outs.items() if v}


def _num(x):
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.7g}")


def result_lines(ib, labels, r, sec, save_errors):
    """One JSON line per image: index, label, prediction, passes, seconds, err and delta per class."""
    lines = []
    for n, i in enumerate(ib):
        rec = {"idx": i, "label": int(labels[n]), "pred": int(r["pred"][n]), "nfe": int(r["nfe"][n]), "sec": sec / len(ib),
               "err": [_num(v) for v in r["err"][n]], "delta": [_num(v) for v in r["delta"][n]]}
        if save_errors:
            rec["E"] = [[_num(v) for v in row] for row in r["E"][n]]
        lines.append(json.dumps(rec))
    return "".join(line + "\n" for line in lines)


def read_results(path):
    """Per-image records of one shard file. Only newline-terminated lines count: a torn last line (a crash
    mid-append) is cut off the file, so the next append starts clean and that image is redone."""
    recs, good = {}, 0
    if not os.path.exists(path):
        return recs
    with open(path, "rb") as f:
        raw = f.read()
    for line in raw.split(b"\n")[:-1]:  # the piece after the last newline is empty or torn
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        recs.setdefault(rec["idx"], rec)
        good += len(line) + 1
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return recs


def append_atomic(path, text):
    """Append whole lines in one write, then fsync: a crash loses at most this chunk, which resume redoes."""
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def parse_shard(s, dist):
    try:
        i, n = (int(v) for v in s.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard {s!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i * dist.world_size + dist.rank, n * dist.world_size


def shard_file(out_dir, i, n):
    return os.path.join(out_dir, "results", f"shard-{i:04d}-of-{n:04d}.jsonl")


def merge(out_dir, quiet=False):
    """Gather every shard's per-image results into metrics.json (+ confusion.png); None while shards are missing."""
    run = load_json(os.path.join(out_dir, "run.json"))
    recs = {}
    rdir = os.path.join(out_dir, "results")
    for f in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
        if f.endswith(".jsonl"):
            for k, v in read_results(os.path.join(rdir, f)).items():
                recs.setdefault(k, v)
    want = run["indices"]
    missing = [i for i in want if i not in recs]
    if missing:
        if not quiet:
            print(f"{len(want) - len(missing)}/{len(want)} images classified; run the remaining shards, then `merge --out-dir {out_dir}`")
        return None
    rows = [recs[i] for i in want]
    K = run["num_classes"]
    y = torch.tensor([r["label"] for r in rows])
    pred = torch.tensor([r["pred"] for r in rows])
    delta = torch.tensor([[float("nan") if v is None else v for v in r["delta"]] for r in rows])
    nfe = torch.tensor([r["nfe"] for r in rows], dtype=torch.float)
    sec = sum(r["sec"] for r in rows)
    acc, f1, cm = accuracy_f1(pred, y, K)
    tau = run["tau"]
    nll, ece = nll_ece(class_probs(delta, tau), y)
    n_cand = len(run["classes"]) if run["classes"] else K
    metrics = {"accuracy": acc, "macro_f1": f1, "chance": 1.0 / n_cand, "n_images": len(rows),
               "nfe_per_image": nfe.mean().item(), "nfe_max": nfe.max().item(), "nfe_exhaustive": n_cand * run["n_slots"],
               "img_s": len(rows) / max(sec, 1e-9), "sec_per_image": sec / len(rows),
               "nll": nll, "ece": ece, "tau": tau, "calibrated": run["calibrated"],
               "schedule": run["schedule"], "policy": run["policy_text"], "loss": run["loss"], "target": run["target"],
               "weighting": run["weighting"], "n_slots": run["n_slots"], "t_grid": run["t_grid"]}
    save_json(os.path.join(out_dir, "metrics.json"), metrics)
    names = run["class_names"]
    if K <= 100:
        save_heatmap(cm.numpy(), os.path.join(out_dir, "confusion.png"), names, names,
                     title=f"confusion (rows: true), accuracy {acc:.3f}", fmt="{:.0f}")
    if not quiet:
        print(f"accuracy {acc:.4f} macro-F1 {f1:.4f} (chance {1 / n_cand:.4f}) | {nfe.mean():.1f} passes/image "
              f"(exhaustive {n_cand * run['n_slots']}) | {metrics['img_s']:.2f} img/s | NLL {nll:.4f} ECE {ece:.4f} (tau {tau:.3g})")
    return metrics


# ----------------------------------------------------------------------------------------------
# Stages


def _same_data(a, b):
    if len(a) != len(b):
        return False
    x = a.images[:1] if a.images is not None else a.latents["mean"][:1]
    z = b.images[:1] if b.images is not None else b.latents["mean"][:1]
    return x.shape == z.shape and bool((x == z).all())


def resolve_data(args, den, cfg, device):
    """Test and validation data of a classify run -> (test ds, test indices available, val ds or None, note, Space)."""
    spec = args.data or cfg.get("data")
    if spec is None:
        raise UserError("--data is required with an official DiT file: a latents .safetensors (vae.py encode) or images with --vae-path")
    image_size = args.image_size or cfg.get("image_size")
    test = data.load(spec, args.split, image_size, flag=f"--data (this stage classifies --split {args.split})")
    if test.labels is None:
        raise UserError(f"--data {spec}: classification needs labels")
    if isinstance(den, SDDenoiser) and den.classes is None:  # prompt templates: the data's class names fill them
        den.set_classes(test.classes)
    if den.named:  # data label i means the data's class i: map it to the denoiser's class of that name (or wnid)
        test = data.relabel(test, den.classes, f"--data {spec}")
    if int(test.labels.max()) >= den.num_classes:
        raise UserError(f"--data {spec}: labels go up to {int(test.labels.max())}, the model has {den.num_classes} classes")
    amp = resolve_amp(args.amp, device)
    space = Space(test, args.vae_path or cfg.get("vae_path"), device, amp, vae_model=getattr(den, "vae", None))
    if tuple(space.sample_shape) != tuple(den.sample_shape):
        raise UserError(f"--data {spec}: model inputs are {tuple(space.sample_shape)}, the denoiser takes {tuple(den.sample_shape)}"
                        + (" (pass --vae-path to encode images to latents)" if space.kind == "pixel" else ""))
    avail, val, note = torch.arange(len(test)), None, ""
    if args.n_val > 0:
        g = torch.Generator().manual_seed(args.seed)
        if args.val_data:
            vds = data.load(args.val_data, "train", image_size)
            val, note = vds.subset(torch.randperm(len(vds), generator=g)[:args.n_val]), f"{args.val_data} (--val-data)"
        elif cfg.get("val_indices") and spec == cfg.get("data"):
            tr = data.load(spec, "train", image_size, flag="--val-data")
            val, note = tr.subset(torch.tensor(cfg["val_indices"][:args.n_val])), "train-split images held out from training"
            if len(cfg["val_indices"]) < args.n_val:
                print(f"note: --n-val {args.n_val}, but the checkpoint held out only {len(cfg['val_indices'])} training images "
                      f"(train --n-val); calibrating on those (pass --val-data for more)")
        else:
            tr = data.load(spec, "train", image_size, flag="--val-data")
            if _same_data(tr, test) and cfg.get("kind") == "dit-official":
                raise UserError(f"--n-val {args.n_val}: --data {spec} is one split, and an official DiT run classifies all of it; "
                                "pass --val-data (e.g. ImageNet train latents) to calibrate, or --n-val 0")
            if _same_data(tr, test):  # a single file or folder: hold images out of the test set instead
                perm = torch.randperm(len(test), generator=g)
                val, avail = test.subset(perm[:args.n_val]), perm[args.n_val:].sort().values
                note = f"{args.n_val} images of --data held out from the test set"
            else:
                val = tr.subset(torch.randperm(len(tr), generator=g)[:args.n_val])
                note = "random train-split images (may have been seen in training)"
        if val.labels is None:
            raise UserError("the validation data has no labels")
        if den.named:
            val = data.relabel(val, den.classes, f"the validation data ({note})")
        if tuple(val.sample_shape) != tuple(test.sample_shape):
            raise UserError(f"validation samples are {tuple(val.sample_shape)}, test samples {tuple(test.sample_shape)}")
    return test, avail, val, note, space


def apply_protocol(args):
    """Set the flags of --protocol (PROTOCOLS); a flag the user set to another value than the protocol's is refused."""
    if not getattr(args, "protocol", None):
        return
    q = argparse.ArgumentParser()
    add_classify_args(q)
    default = vars(q.parse_args([]))
    for k, v in PROTOCOLS[args.protocol].items():
        given = getattr(args, k)
        if given != default[k] and given != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"--protocol {args.protocol} runs {flag} {v}, not {given}: drop {flag} (or --protocol)")
        setattr(args, k, v)


def stage_args(args):
    """(n_samples, to_keep) of the paper schedule from the flags, counted in timesteps (each with --n-noise draws,
    the official n_trials); the grid has max(n_samples) timesteps."""
    if args.n_noise < 1:
        raise UserError(f"--n-noise {args.n_noise}: expected 1 or more draws per timestep")
    if args.t:
        n_samples = args.n_samples or [len(args.t)]
    else:
        n_samples = args.n_samples or [50, 500]
    to_keep = args.to_keep or ([5, 1] if args.n_samples is None and not args.t else [1] * len(n_samples))
    if args.to_keep is None and len(n_samples) > 1 and args.n_samples is not None:
        raise UserError("--to-keep is needed with several --n-samples stages (e.g. --n-samples 50 500 --to-keep 5 1)")
    if len(n_samples) != len(to_keep):
        raise UserError(f"--n-samples {n_samples} and --to-keep {to_keep} need the same number of stages")
    if sorted(n_samples) != list(n_samples) or any(k < 1 for k in to_keep):
        raise UserError(f"--n-samples must increase ({n_samples}) and --to-keep be positive ({to_keep})")
    return n_samples, to_keep


def build_policy(args, M, n_cand):
    if args.schedule == "full":
        return full_policy(M)
    n_samples, to_keep = stage_args(args)
    if n_samples[-1] * args.n_noise != M:
        raise UserError(f"the last --n-samples stage ({n_samples[-1]}) must equal the number of timesteps ({M // args.n_noise})")
    return paper_policy(M, n_samples, [min(k, n_cand) for k in to_keep], args.seq_alpha, args.seq_every, args.seq_min_n,
                        args.n_noise)


def _cal_settings(args, grid):
    return {"ckpt": os.path.abspath(args.sd_path or args.ckpt), **({"prompts": args.prompts} if args.sd_path else {}), "data": args.data, "val_data": args.val_data, "n_val": args.n_val, "seed": args.seed,
            "t_grid": grid, "loss": args.loss, "target": args.target, "weighting": args.weighting, "classes": args.classes,
            "auto_budget": args.auto_budget}


def calibrate(args, err_fn, space, val, grid, K, alive0, policy, dist, log=print):
    """The validation pass: the auto schedule (searched on every class's error at every slot of the
    validation images) and tau for the schedule in use. A calibration.json of the same settings (this
    run's, or --calibration) is reused: its validation errors calibrate any other schedule for free.
    Writes OUT_DIR/calibration.json (+ val_errors.safetensors); returns (policy, calibration dict)."""
    M, dev = len(grid), dist.device
    settings = _cal_settings(args, grid)
    path = args.calibration or os.path.join(args.out_dir, "calibration.json")
    cal = load_json(path) if os.path.exists(path) else None
    if cal is not None and cal.get("settings") != settings:
        if args.calibration:
            diff = [k for k in settings if cal.get("settings", {}).get(k) != settings[k]]
            raise UserError(f"--calibration {path}: made with other settings ({', '.join(diff)})")
        cal = None
    E = yv = e_file = None
    if cal is not None and cal.get("val_errors"):
        e_file = os.path.join(os.path.dirname(os.path.abspath(path)), cal["val_errors"])
        try:
            t = load_file(e_file)
        except Exception as e:
            raise UserError(f"{e_file}: unreadable validation errors ({type(e).__name__})")
        E, yv = t["E"].to(dev), t["labels"].to(dev)
    if args.schedule == "auto" and cal is not None and cal.get("auto_policy"):
        policy = Policy.from_json(cal["auto_policy"])
    if cal is not None and cal.get("policy") == policy.to_json() and cal.get("tau_given") == args.tau:
        return policy, cal
    if val is None and E is None:
        if args.schedule == "auto":
            raise UserError("--schedule auto needs validation images (--n-val > 0)")
        if cal is not None:
            raise UserError(f"--calibration {path}: holds no validation errors to calibrate this schedule with; give --n-val")
        return policy, {"tau": args.tau or 1.0, "calibrated": False, "val": None}
    t0 = time.time()
    if E is None and (args.schedule == "auto" or args.val_full):
        E, yv, e_file = _sharded_images(err_fn, space, val, full_policy(M), M, K, args, 1, alive0, dist)["E"].to(dev), val.labels.to(dev), None
    n = len(yv) if yv is not None else len(val)
    a0 = alive0[None].expand(n, K).to(dev) if alive0 is not None else None
    auto, info = None, {}
    if args.schedule == "auto":
        if cal is not None and cal.get("auto_policy"):
            info = cal.get("search", {})
        else:
            policy, info = search_policy(E, yv, a0, args.auto_budget, grid, log=log)
        auto = policy.to_json()
    if E is not None:
        r = simulate(E, policy, a0)
    else:
        r, yv = _sharded_images(err_fn, space, val, policy, M, K, args, 1, alive0, dist), val.labels
        r = {k: v.to(dev) for k, v in r.items()}
        yv = yv.to(dev)
    tau = args.tau or fit_tau(r["delta"], yv)
    nll, ece = nll_ece(class_probs(r["delta"].cpu(), tau), yv.cpu())
    new = {"settings": settings, "policy": policy.to_json(), "auto_policy": auto, "search": info,
           "tau": tau, "tau_given": args.tau, "calibrated": args.tau is None,
           "val": {"n": n, "accuracy": (r["pred"] == yv).float().mean().item(), "nfe_per_image": r["nfe"].float().mean().item(),
                   "nll": nll, "ece": ece, "seconds": time.time() - t0},
           "val_errors": None}
    if dist.is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        if E is not None and e_file is None:
            e_file = os.path.join(args.out_dir, "val_errors.safetensors")
            save_safetensors({"E": E, "labels": yv}, e_file)
        if e_file is not None:
            new["val_errors"] = os.path.relpath(e_file, os.path.abspath(args.out_dir))
        save_json(os.path.join(args.out_dir, "calibration.json"), new)
    log(f"calibration on {n} validation images: tau {tau:.4g}, val accuracy {new['val']['accuracy']:.4f} at "
        f"{new['val']['nfe_per_image']:.1f} passes/image, NLL {nll:.4f}, ECE {ece:.4f}")
    return policy, new


def _sharded_images(err_fn, space, ds, policy, M, K, args, stream, alive0, dist):
    """Run a policy over a whole (validation) data set, images split over torchrun ranks, results on every rank."""
    mine = [i for i in range(len(ds)) if i % dist.world_size == dist.rank]
    bar = Progress("calibrate" if stream == 1 else "validate", len(mine), dist)
    r = classify_images(err_fn, space, ds, mine, policy, M, K, args.seed, stream, args.batch_size, alive0, dist.device,
                        on_batch=lambda ib, r, sec: bar.update(len(ib)))
    if dist.world_size == 1:
        return r
    out, rows = {}, torch.tensor(mine, dtype=torch.long, device=dist.device)
    for k, v in r.items():  # every image belongs to one rank: a sum puts each row (NaNs included) in place
        full = torch.zeros((len(ds), *v.shape[1:]), dtype=v.dtype, device=dist.device)
        full[rows] = v.to(dist.device)
        torch_dist.all_reduce(full)
        out[k] = full.cpu()
    return out


def classify(args):
    """Classify a data set with a class-conditional denoiser; resumable, shardable; merge -> metrics.json."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    si, sn = parse_shard(args.shard, dist)
    apply_protocol(args)
    sd_defaults(args)
    stage_args(args)  # flag errors before any work
    den, cfg = load_sd_denoiser(args, dist.device) if args.sd_path else load_denoiser(args.ckpt, dist.device)
    log = print if dist.is_main else (lambda *a, **k: None)
    test, avail, val, val_note, space = resolve_data(args, den, cfg, dist.device)
    betas = getattr(den, "betas", (1e-4, 0.02))
    diffusion = (TableDiffusion(den.pipe.alphas_cumprod, dist.device) if isinstance(den, SDDenoiser)
                 else Diffusion(den.T, beta_start=betas[0], beta_end=betas[1], device=dist.device, scale_to_T=den.kind != "ddae-unet"))
    grid = timestep_grid(den.T, max(stage_args(args)[0]), args.t, args.n_noise)
    M, K = len(grid), den.num_classes
    alive0 = None
    if args.classes:
        if any(c < 0 or c >= K for c in args.classes):
            raise UserError(f"--classes must lie in [0, {K - 1}]")
        alive0 = torch.zeros(K, dtype=torch.bool, device=dist.device)
        alive0[torch.tensor(args.classes)] = True
    n_cand = len(args.classes) if args.classes else K
    policy = build_policy(args, M, n_cand)
    g = torch.Generator().manual_seed(args.seed)
    indices = avail[torch.randperm(len(avail), generator=g)[:args.n_test]].sort().values if 0 < args.n_test < len(avail) else avail
    indices = indices.tolist()
    run = {"ckpt": os.path.abspath(args.sd_path or args.ckpt), **({"prompts": den.prompts} if args.sd_path else {}),
           "data": args.data or cfg.get("data"), "split": args.split, "seed": args.seed,
           "indices": indices, "num_classes": K, "classes": args.classes, "class_names": den.classes,
           "t_grid": grid, "n_slots": M, "loss": args.loss, "target": args.target, "weighting": args.weighting,
           "schedule": args.schedule, "policy": policy.to_json(), "policy_text": policy.describe(grid),
           "tau": None, "calibrated": None, "val_note": val_note, "protocol": args.protocol,
           "noise": os.path.abspath(args.noise_path) if args.noise_path else "per image: (seed, image index)"}
    run_path = os.path.join(args.out_dir, "run.json")
    old = load_json(run_path) if os.path.exists(run_path) else None

    def refuse_another_run(skip):
        diff = [k for k in run if k not in skip and old.get(k) != run[k]]
        if diff:
            raise UserError(f"--out-dir {args.out_dir}: holds results of another run (differs in {', '.join(diff)}); use a new --out-dir")
    if old is not None:  # before calibrate writes there: another run's calibration.json stays as it is
        refuse_another_run(("val_note", "tau", "calibrated") + (("policy", "policy_text") if args.schedule == "auto" else ()))
    err_fn = ErrorFn(den, diffusion, grid, args.loss, args.target, args.weighting, args.max_batch,
                     resolve_amp(args.amp, dist.device), args.compile)
    if isinstance(den, SDDenoiser):  # the classes' errors from their prompts' (averaged over an ensemble)
        err_fn = PromptErrors(err_fn, den.groups)
    policy, cal = calibrate(args, err_fn, space, val, grid, K, alive0, policy, dist, log)
    run.update(policy=policy.to_json(), policy_text=policy.describe(grid), tau=cal["tau"], calibrated=cal["calibrated"])
    noise = shared_noise(args.noise_path, policy, space.sample_shape) if args.noise_path else None
    os.makedirs(os.path.join(args.out_dir, "results"), exist_ok=True)
    if old is not None:
        refuse_another_run(("val_note", "tau", "calibrated"))
        run = old  # a shard started on another machine keeps the first one's tau (merge reads it from run.json)
    elif dist.is_main:
        save_json(run_path, run)
    mine = [i for p, i in enumerate(indices) if p % sn == si]
    path = shard_file(args.out_dir, si, sn)
    done = read_results(path)
    todo = [i for i in mine if i not in done]
    log(f"classify {len(indices)} images ({test.num_classes} classes, {n_cand} candidates) with {policy.describe(grid)}; "
        f"shard {si}/{sn}: {len(mine)} images, {len(mine) - len(todo)} already done")
    labels = test.labels

    bar = Progress("classify", len(todo), dist, every=0.0 if args.progress else float("inf"))

    def on_batch(ib, r, sec):
        append_atomic(path, result_lines(ib, labels[torch.tensor(ib)], r, sec, args.save_errors))
        bar.update(len(ib), f" | {r['nfe'].float().mean():.1f} passes/image, {len(ib) / sec:.2f} img/s")
    classify_images(err_fn, space, test, todo, policy, M, K, args.seed, 0, args.batch_size, alive0, dist.device,
                    on_batch=on_batch, keep_E=False, shared_noise=noise)
    if dist.world_size > 1:
        torch_dist.barrier()
    if dist.is_main:
        return merge(args.out_dir)
    return None


# ----------------------------------------------------------------------------------------------
# score: image-text matching with Stable Diffusion (the paper's compositional evaluation)


def read_texts(spec):
    """--texts: one .txt file (a text per line) or the texts themselves."""
    if len(spec) == 1 and spec[0].endswith(".txt") and os.path.isfile(spec[0]):
        with open(spec[0], encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            raise UserError(f"--texts {spec[0]}: no lines")
        return texts
    return list(spec)


@torch.no_grad()
def score(args):
    """The error matrix of N images x M texts: err[i, m] = mean over the slot grid of ||eps - eps(x_t, t, text m)||^2,
    with the same (t, eps) for every text of an image (paired). The lower, the better text m matches image i (the
    paper's image-text matching). Writes scores.json (errors, each image's best text) and scores.png (heatmap)."""
    dist = setup_distributed(args.device)
    compile_default(args, dist)
    args.image_size = args.image_size or 512
    import sd
    texts = read_texts(args.texts)
    pipe = sd.load(args.sd_path, device=dist.device, tokenizer=args.tokenizer, prediction_type=args.prediction_type)
    den = SDDenoiser(pipe, [(t, i, t) for i, t in enumerate(texts)], args.image_size).eval()
    ds = data.load(args.data, args.split, args.image_size, flag="--data")
    if ds.images is None:
        raise UserError(f"--data {args.data}: holds latents; score needs images (encoded by the SD model's own VAE)")
    amp = resolve_amp(args.amp, dist.device)
    space = Space(ds, None, dist.device, amp, vae_model=pipe.vae)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=g)[:args.n_images].sort().values if 0 < args.n_images < len(ds) else torch.arange(len(ds))
    grid = timestep_grid(den.T, args.n_samples)
    M, K = len(grid), len(texts)
    err_fn = PromptErrors(ErrorFn(den, TableDiffusion(pipe.alphas_cumprod, dist.device), grid, args.loss,
                                  max_batch=args.max_batch, amp=amp, compile=args.compile), den.groups)
    bar = Progress("score", len(idx), dist)
    r = classify_images(err_fn, space, ds, idx.tolist(), full_policy(M), M, K, args.seed, 0, args.batch_size, None,
                        dist.device, on_batch=lambda ib, r, sec: bar.update(len(ib)), keep_E=False)
    err = r["err"]  # (N, K)
    names = [f"image {i}" + (f" ({ds.classes[int(ds.labels[i])]})" if ds.labels is not None and ds.classes else "") for i in idx.tolist()]
    out = {"texts": texts, "images": idx.tolist(), "image_names": names, "error": [[_num(v) for v in row] for row in err],
           "best_text": err.argmin(1).tolist(), "t_grid": grid, "n_slots": M, "loss": args.loss, "sd_path": args.sd_path}
    if len(idx) == K:  # image i and text i as pairs: how often an image picks its own text
        out["diagonal_accuracy"] = (err.argmin(1) == torch.arange(K)).float().mean().item()
    os.makedirs(args.out_dir, exist_ok=True)
    save_json(os.path.join(args.out_dir, "config.json"), vars(args))
    save_json(os.path.join(args.out_dir, "scores.json"), out)
    short = [t if len(t) <= 40 else t[:37] + "..." for t in texts]
    save_heatmap(err.numpy(), os.path.join(args.out_dir, "scores.png"), names, short,
                 title=f"eps error (lower: better match), {M} slots", vmin=float(err.min()))
    print(f"scored {len(idx)} images x {K} texts over {M} slots; wrote {os.path.join(args.out_dir, 'scores.json')}"
          + (f" | diagonal accuracy {out['diagonal_accuracy']:.3f}" if "diagonal_accuracy" in out else ""))
    return out


# ----------------------------------------------------------------------------------------------
# train: a class-conditional DiT on the user's data, with classifier-free label dropout


def train(args):
    """Train a class-conditional DiT (eps-prediction, linear betas) on a labeled data set, holding out
    --n-val train images for calibration. The checkpoint is repcond_dit.py's format (config.json +
    safetensors), so `repcond_dit.py sample/classify` read it too."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    ds = data.load(args.data, "train", args.image_size)
    test = data.load(args.test_data or args.data, "test", args.image_size)  # before training: a missing split stops nothing
    if ds.labels is None or not ds.classes:
        raise UserError(f"--data {args.data}: training a class-conditional model needs labels")
    space = Space(ds, args.vae_path, dist.device, resolve_amp(args.amp, dist.device))
    if args.model not in DiT_models:
        raise UserError(f"--model must be one of {sorted(DiT_models)}")
    if space.sample_shape[1] % DiT_models[args.model]["patch_size"]:
        raise UserError(f"--model {args.model}: patch size does not divide the input size {space.sample_shape[1]}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))
    n_val = min(args.n_val, len(ds) // 2)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:]
    cfg = dict(stage="train", script="diffusion_classifier", test_data=args.test_data, model=args.model, cond="label", inject=None, rep_dim=0,
               sample_shape=list(space.sample_shape), num_classes=len(ds.classes), learn_sigma=False, class_dropout=args.class_dropout,
               T=args.T, data=args.data, image_size=args.image_size, vae_path=args.vae_path, scaling_factor=space.scaling_factor,
               classes=ds.classes, amp=args.amp, val_indices=val_idx.tolist(), args=vars(args))
    model = build_model(cfg)
    loader = data.Loader(ds.subset(train_idx), args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)
    diffusion = Diffusion(args.T, device=dist.device)
    flops = transformer_flops_per_image(model.denoiser, (space.sample_shape[1] // model.denoiser.patch_size) ** 2)

    def loss_fn(net, x, y, step):
        return diffusion_loss(net, diffusion, space.sample_z0(x, args.seed, step, dist), step, args.seed, dist, y=y,
                              class_dropout=args.class_dropout)
    model, ema = fit(model, loss_fn, loader, args, dist, args.out_dir, cfg, flops_per_image=flops)
    loss = eval_loss(ema, space, test, diffusion, dist.device, seed=args.seed)
    metrics = {"eval_loss": loss, "steps": args.steps, "n_train": len(train_idx), "n_val_held_out": n_val}
    RunLog(args.out_dir, dist).metrics(metrics)
    if dist.is_main:
        print(f"train done: held-out eps-MSE {loss:.4g}; checkpoint {os.path.join(args.out_dir, 'ckpt')}")
    return metrics


@torch.no_grad()
def eval_loss(model, space, ds, diffusion, device, n=256, batch_size=128, seed=0):
    """Held-out class-conditional eps-MSE with fixed (t, eps) per batch (labels given, never dropped)."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    total, count = 0.0, 0
    for b, (x, y, _) in enumerate(data.iterate(ds.subset(idx), batch_size, device)):
        z0 = space.encode(x, generator=False)
        g = torch.Generator(device=device).manual_seed(seed * 1000 + b)
        t = torch.randint(0, diffusion.T, (len(z0),), generator=g, device=device)
        eps = torch.randn(z0.shape, generator=g, device=device)
        out = model.denoiser(diffusion.q_sample(z0, t, eps), t, y=y)
        total += F.mse_loss(out[:, :z0.shape[1]].float(), eps, reduction="sum").item()
        count += eps.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# bench: batched + compiled classification against a one-class-at-a-time loop


@torch.no_grad()
def bench(args):
    """images/s of classification with a random-weight DiT: one flat batch (images x classes x timesteps)
    per forward, bf16 + compile on CUDA, against the naive loop (one forward per image and class, its
    timesteps batched, fp32 eager). Same passes per image in every mode."""
    dist = setup_distributed(args.device, args.amp)
    dev = dist.device
    C, H = args.latent_shape[0], args.latent_shape[1]
    dit = DiT(input_size=H, in_channels=C, num_classes=args.num_classes, learn_sigma=True, **DiT_models[args.model]).to(dev).eval()
    for p in dit.parameters():  # random weights that produce non-trivial outputs (adaLN-Zero would give zeros)
        p.data.normal_(0, 0.02)
    den = Denoiser(dit, args.num_classes, (C, H, H))
    diffusion = Diffusion(1000, device=dev)
    grid = timestep_grid(1000, args.n_samples)
    M, K = len(grid), args.num_classes
    cand = torch.zeros(K, dtype=torch.bool, device=dev)
    cand[:args.bench_classes] = True
    z0 = torch.randn(args.n_images, C, H, H, device=dev)
    noise = torch.randn(args.n_images, M, C, H, H, device=dev)
    policy = full_policy(M)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = {}

    def timed(fn, n_img):
        fn(max(1, n_img // 8))  # warm-up (compiles)
        sync()
        t0 = time.time()
        fn(n_img)
        sync()
        return n_img / (time.time() - t0)

    def naive(n):  # the paper's loop: one forward per (image, class), its M timesteps batched
        for i in range(n):
            algorithm1(den, diffusion, z0[i], grid, noise[i], [M], [1], range(args.bench_classes))
    modes = {"naive_fp32_eager": (naive, None)}
    amp = "bf16" if dev.type == "cuda" else "none"
    modes["batched_fp32_eager"] = (None, ErrorFn(den, diffusion, grid, max_batch=args.max_batch))
    if dev.type == "cuda":
        modes["batched_bf16_eager"] = (None, ErrorFn(den, diffusion, grid, max_batch=args.max_batch, amp=amp))
        modes["batched_bf16_compile"] = (None, ErrorFn(den, diffusion, grid, max_batch=args.max_batch, amp=amp, compile=True))
    for name, (fn, ef) in modes.items():
        if fn is None:
            def fn(n, ef=ef):
                for s in range(0, n, args.batch_size):
                    b = min(args.batch_size, n - s)
                    run_policy(ef.bind(z0[s:s + b], noise[s:s + b]), b, K, M, policy, cand[None].expand(b, K), dev)
        n_img = args.n_images if name != "naive_fp32_eager" else max(2, args.n_images // 4)
        results[name] = timed(fn, n_img)
        print(f"{name:24s} {results[name]:9.3f} img/s  ({args.bench_classes * M} passes/image)", flush=True)
    best = max(v for k, v in results.items() if k != "naive_fp32_eager")
    out = {"model": args.model, "latent_shape": [C, H, H], "classes_per_image": args.bench_classes, "n_samples": M,
           "nfe_per_image": args.bench_classes * M, "img_s": results, "speedup_vs_naive": best / results["naive_fp32_eager"],
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "max_batch": args.max_batch, "batch_size": args.batch_size}
    os.makedirs(args.out_dir, exist_ok=True)
    save_json(os.path.join(args.out_dir, "bench.json"), out)
    print(json.dumps(out))
    return out


# ----------------------------------------------------------------------------------------------
# The bare run: train on `shapes`, calibrate + choose a schedule on held-out images, classify, compare


def pipeline(args):
    """python diffusion_classifier.py --out-dir D: train a small class-conditional DiT on `shapes` (CPU),
    then classify test images with the auto schedule and with the exhaustive one on the same images."""
    t_start, cpu_start, out = time.time(), time.process_time(), args.out_dir
    p = build_parser()
    common = ["--device", args.device, "--seed", str(args.seed), "--amp", args.amp,
              *({True: ["--compile"], False: ["--no-compile"]}.get(args.compile, []))]
    size = ["--image-size", str(args.image_size)] if args.image_size else []
    train(p.parse_args(["train", "--out-dir", f"{out}/train", *common, *size, "--data", args.data, "--model", args.model, "--steps", str(args.steps),
                        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--n-val", str(args.n_val), "--log-every", "100",
                        "--ckpt-every", str(args.steps), "--warmup", "50", "--ema-warmup", "--grad-clip", "1",  # a short run
                        *(["--no-augment"] if args.no_augment else []),
                        *(["--overwrite"] if args.overwrite else [])]))
    t_train = time.time() - t_start
    cls = ["--ckpt", f"{out}/train/ckpt", *common, "--n-test", str(args.n_test),
           "--n-val", str(args.n_val), "--n-samples", *map(str, args.n_samples), "--batch-size", "50", "--loss", args.loss]
    r_auto = classify(p.parse_args(["classify", "--out-dir", f"{out}/classify", "--schedule", "auto", *cls]))
    r_full = classify(p.parse_args(["classify", "--out-dir", f"{out}/classify_full", "--schedule", "full", "--save-errors",
                                    "--calibration", f"{out}/classify/calibration.json", *cls]))
    cal = load_json(f"{out}/classify/calibration.json")
    # other schedules, simulated on the exhaustive run's test errors (same noise, so exactly what they would compute)
    recs = [json.loads(line) for f in sorted(os.listdir(f"{out}/classify_full/results"))
            for line in open(os.path.join(f"{out}/classify_full/results", f)) if line.strip()]
    recs.sort(key=lambda r: r["idx"])
    E = torch.tensor([[[float("nan") if v is None else v for v in row] for row in r["E"]] for r in recs])
    y = torch.tensor([r["label"] for r in recs])
    M, K = E.shape[2], E.shape[1]
    paper = paper_policy(M, [max(1, M // 8), M], [max(1, K // 2), 1])
    sims = {"exhaustive": full_policy(M), "auto": Policy.from_json(cal["policy"]),
            f"paper_adaptive_{M // 8}_{M}_keep{K // 2}_1": paper,
            "sequential_alpha0.05": paper_policy(M, [M], [1], 0.05, 1, 3)}
    per_t = [((E[:, :, j].argmin(1) == y).float().mean().item(), j) for j in range(M)]
    best_t = max(per_t)[1]
    sims[f"single_t{r_full['t_grid'][best_t]}_best_on_test"] = Policy([best_t], [(1, 1)])
    policies = {"accuracy_per_t": {str(r_full["t_grid"][j]): a for a, j in sorted(per_t, key=lambda x: x[1])}}
    for name, pol in sims.items():
        r = simulate(E, pol)
        policies[name] = {"accuracy": (r["pred"] == y).float().mean().item(), "nfe_per_image": r["nfe"].float().mean().item()}
    metrics = {"accuracy": r_auto["accuracy"], "chance": r_auto["chance"], "nfe_per_image": r_auto["nfe_per_image"],
               "accuracy_full": r_full["accuracy"], "nfe_full": r_full["nfe_per_image"],
               "nfe_fraction": r_auto["nfe_per_image"] / r_full["nfe_per_image"],
               "macro_f1": r_auto["macro_f1"], "macro_f1_full": r_full["macro_f1"],
               "img_s": r_auto["img_s"], "img_s_full": r_full["img_s"],
               "nll": r_auto["nll"], "ece": r_auto["ece"], "tau": r_auto["tau"],
               "nll_full": r_full["nll"], "ece_full": r_full["ece"], "tau_full": r_full["tau"],
               "schedule": r_auto["policy"], **{k: cal["search"].get(k) for k in ("val_accuracy", "val_accuracy_full", "val_nfe", "val_nfe_full")},
               "n_test": r_auto["n_images"], "n_val": args.n_val, "n_slots": M, "policies_simulated_on_test": policies,
               "train_seconds": t_train, "calibration_seconds": cal["val"]["seconds"], "total_seconds": time.time() - t_start,
               "cpu_seconds": time.process_time() - cpu_start,
               "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}
    save_json(os.path.join(out, "metrics.json"), metrics)
    save_curve(r_full["t_grid"], {"test accuracy of one timestep": [a for a, _ in sorted(per_t, key=lambda x: x[1])]},
               os.path.join(out, "accuracy_per_t.png"), "t", "accuracy", "one slot, all classes (exhaustive run's errors)")
    print(f"\naccuracy {metrics['accuracy']:.3f} at {metrics['nfe_per_image']:.1f} passes/image | exhaustive {metrics['accuracy_full']:.3f} at "
          f"{metrics['nfe_full']:.0f} ({100 * metrics['nfe_fraction']:.1f}% of its passes) | chance {metrics['chance']:.3f} | "
          f"ECE {metrics['ece']:.3f} (NLL {metrics['nll']:.3f}) | {metrics['total_seconds']:.0f} s")
    return metrics


def main(args):
    stages = {"train": train, "classify": classify, "score": score, "bench": bench, None: pipeline,
              "merge": lambda a: merge(a.out_dir)}
    if args.cmd is not None:
        check_out_dir(args, resumable=args.cmd in ("classify", "merge"))  # classify resumes and refuses other runs itself
    try:
        return stages[args.cmd](args)
    finally:
        cleanup_distributed()


# ----------------------------------------------------------------------------------------------
# Numerics: Student's t tail and quantile for the sequential test (no scipy needed)


def _betacf(a, b, x):
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes' betacf)."""
    qab, qap, qam, c, d = a + b, a + 1, a - 1, 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1 + aa / c if abs(1 + aa / c) > 1e-300 else 1e-300
            h *= d * c
            last = d * c
        if abs(last - 1) < 1e-14:
            break
    return h


def t_sf(t, df):
    """P(T > t) of Student's t with df degrees of freedom, t >= 0 (via the incomplete beta function)."""
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) if 0 < x < 1 else 0.0
    ib = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1 - front * _betacf(b, a, 1 - x) / b
    return 0.5 * (ib if x < 1 else 1.0)


@lru_cache(maxsize=4096)
def t_quantile(p_upper, df):
    """The t with P(T > t) = p_upper (bisection on t_sf; cached, since few (level, df) pairs occur)."""
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > p_upper and hi < 1e12:
        hi *= 2
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_sf(mid, df) > p_upper else (lo, mid)
    return hi


if __name__ == "__main__":
    run(main, build_parser())
