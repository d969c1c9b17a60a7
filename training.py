"""
Run plumbing shared by the four method scripts: distributed set-up, the one training loop `fit` (EMA, AMP,
compile, DDP, NaN guard, exact resume), checkpoints, logs, common flags, small metrics, FID and pictures.

Nothing here knows a paper: the method files (repcond_dit.py, ddae_probe.py, diffusion_classifier.py,
repfusion.py) and models.py / vae.py import it; it imports only data.py.
"""
import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import data
from cli import INCEPTION_FILE, UserError


# ----------------------------------------------------------------------------------------------
# Distributed set-up and precision: plain python or torchrun, one process per GPU

class Dist:
    def __init__(self, rank=0, world_size=1, local_rank=0, device="cpu"):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, torch.device(device)
        self.is_main = rank == 0


def setup_distributed(device_arg="auto", amp="auto"):
    """Plain python or torchrun: nccl on CUDA, gloo on CPU; one process per GPU. TF32 matmuls and convolutions
    are on unless amp is "none" (--amp none means fp32 throughout)."""
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
    set_tf32(amp != "none")
    return Dist(rank, world, local, device)


def set_tf32(on):
    """TF32 for CUDA matmuls and cuDNN convolutions (a no-op on the CPU, where the flags are read by nothing)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)


def cleanup_distributed():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_mean(x, dist):
    if dist.world_size > 1:
        x = x.clone()
        torch_dist.all_reduce(x)
        x /= dist.world_size
    return x


def all_sum(x, dist):
    if dist.world_size > 1:
        x = x.clone()
        torch_dist.all_reduce(x)
    return x


def gather_by_index(values, idx, n, dist):
    """Reassemble per-rank rows (values[i] belongs to sample idx[i]) into one (n, ...) tensor on every rank."""
    out = torch.zeros((n, *values.shape[1:]), device=values.device, dtype=values.dtype)
    out[idx] = values
    if dist.world_size > 1:
        torch_dist.all_reduce(out)  # every sample is owned by exactly one rank
    return out


def resolve_amp(amp, device):
    """--amp auto means bf16 on CUDA and fp32 on the CPU (CPU autocast is slower than fp32 there)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return amp


def autocast(amp, device):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def compile_default(args, dist):
    """--compile unset means torch.compile on CUDA only (on the CPU it costs 30-90 s per model)."""
    if getattr(args, "compile", None) is None:
        args.compile = dist.device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# Randomness: every draw of a training step is a pure function of (seed, step), drawn for the global batch


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


# ----------------------------------------------------------------------------------------------
# Files: JSON, weights-only torch files, strict state dicts, atomic checkpoint folders, run logs


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
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})")


def load_torch(path, what="checkpoint"):
    """torch.load(weights_only=True) with one clear line instead of a traceback: a pickle that would call
    anything else (os.system through __reduce__, ...) is refused, never run. argparse.Namespace is admitted: it is
    plain data, and the official DiT / fast-DiT train.py store their flags as one next to the weights."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
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


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def strip_wrapper_prefixes(sd):
    """A state dict saved from a wrapped model (every key "module.x", "_orig_mod.x", or both nested) -> the plain
    model's keys. Only a prefix shared by every key is removed, so a real submodule named `module` is safe."""
    while sd and any(all(k.startswith(p) for k in sd) for p in WRAPPER_PREFIXES):
        p = next(p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd))
        sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def load_state_dict_strict(model, sd, path):
    """load_state_dict(strict=True), with one line that lists what does not fit instead of a traceback. Keys saved from
    a DDP- or compile-wrapped model are accepted (strip_wrapper_prefixes)."""
    sd = strip_wrapper_prefixes(sd)
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


def umask_mode(path):
    """Give a file the mode the user's umask asks for (as open() would): some writers (safetensors) create 0600 files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_safetensors(tensors, path, metadata=None):
    """A safetensors file written aside and renamed into place (a crash never leaves half a file), with the mode the
    user's umask asks for (safetensors itself creates 0600 files)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(ckpt_dir, model, ema=None, optimizer=None, step=0, config=None, extra=None):
    """Write model/EMA weights (safetensors), optimizer + step + RNG (torch.save of tensors and plain
    containers) and config.json into ckpt_dir atomically: a sibling .tmp folder is filled, then swapped in,
    so a crash leaves either the old checkpoint or the new one, never half of one."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_safetensors(model.state_dict(), os.path.join(tmp, "model.safetensors"))  # with the user's umask
    if ema is not None:
        save_safetensors(ema.state_dict(), os.path.join(tmp, "ema.safetensors"))
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
    """The checkpoint folder to read: ckpt_dir, the run folder's ckpt/ (a run folder is accepted as its checkpoint
    everywhere), or the .old copy a crash mid-swap left behind."""
    inner = os.path.join(ckpt_dir, "ckpt")
    for d in (ckpt_dir, ckpt_dir + ".old", inner, inner + ".old"):
        if os.path.isfile(os.path.join(d, "model.safetensors")) and os.path.isfile(os.path.join(d, "config.json")):
            return d
    if os.path.isfile(ckpt_dir):
        raise UserError(f"{ckpt_dir}: expected a checkpoint folder (model.safetensors and config.json), got a file")
    raise UserError(f"{ckpt_dir}: no checkpoint here (expected model.safetensors and config.json, or a ckpt/ folder with them)")


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

    def log(self, record, echo=True, prefix="", suffix=""):
        if not self.dist.is_main:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(prefix + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()) + suffix, flush=True)

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


# ----------------------------------------------------------------------------------------------
# The training loop and the flags every script shares


class Progress:
    """A progress line for long evaluations (rank 0): `[name] done/total (pct) | elapsed | ETA`, at most every
    `every` seconds and at the end."""
    def __init__(self, name, total, dist=None, every=10.0):
        self.name, self.total, self.done, self.every = name, total, 0, every
        self.main = dist is None or dist.is_main
        self.t0 = self.last = time.time()

    def update(self, n=1, note=""):
        self.done += n
        now = time.time()
        if self.main and (now - self.last >= self.every or self.done >= self.total):
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"[{self.name}] {self.done}/{self.total} ({100 * self.done / max(1, self.total):.0f}%) | "
                  f"{_eta(now - self.t0)} elapsed | ETA {_eta((self.total - self.done) / max(rate, 1e-9))}{note}", flush=True)
            self.last = now


def _eta(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def transformer_flops_per_image(model, tokens):
    """Training FLOPs per image of a transformer (nanoGPT's estimate): 6 * params * tokens for the
    matmuls plus 12 * layers * width * tokens^2 for attention scores (forward + backward)."""
    n = sum(p.numel() for p in model.blocks.parameters())
    return 6 * n * tokens + 12 * len(model.blocks) * model.blocks[0].attn.qkv.in_features * tokens ** 2


def check_resume(ckpt_dir, args):
    """--resume continues a run only with the flags that shaped it (batch, learning rate, schedules, model, data, ...):
    a resumed run that changed one would be neither the old run nor a new one. Only RESUMABLE flags may differ."""
    saved = load_json(os.path.join(ckpt_dir, "config.json")).get("args")
    if not isinstance(saved, dict):
        return
    now = json.loads(json.dumps(vars(args), default=str))
    differ = [k for k in sorted(set(saved) & set(now)) if k not in RESUMABLE and saved[k] != now[k]]
    if differ:
        raise UserError("--resume: " + ", ".join(f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})" for k in differ[:6])
                        + (" differs" if len(differ) == 1 else " differ") + " from the run in " + ckpt_dir
                        + "; resume with its flags, or start a new run")


def fit(model, loss_fn, loader, args, dist, out_dir, config, flops_per_image=0.0, params=None):
    """The training loop every script uses: AdamW or SGD, warm-up and lr steps, grad clipping, EMA, AMP, compile, DDP,
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
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), fused=fused)

    ckpt_dir = os.path.join(out_dir, "ckpt")
    amp = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # its loss scale is training state: checkpointed
    start = 0
    held = [d for d in (ckpt_dir, ckpt_dir + ".old") if os.path.isfile(os.path.join(d, "model.safetensors"))]
    if held and not args.resume and not getattr(args, "overwrite", False):
        raise UserError(f"{out_dir} holds a run's checkpoint already: pass --resume to continue it, --overwrite to replace "
                        f"it, or another --out-dir")
    if args.resume:
        d = find_checkpoint(ckpt_dir)
        check_resume(d, args)
        load_weights(d, model, prefer_ema=False)
        load_weights(d, ema, prefer_ema=True)
        state = load_torch(os.path.join(d, "state.pt"), "training state (optimizer, step, RNG)")
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "scaler" in state.get("extra", {}):
            scaler.load_state_dict(state["extra"]["scaler"])
        start = state["step"]
        if start > args.steps:
            raise UserError(f"--steps {args.steps}: the checkpoint in {d} is at step {start} already; pass --steps above "
                            f"{start} to continue it")
        if dist.is_main:
            print(f"resumed from {d} at step {start}" + (" (= --steps: nothing left to train)" if start == args.steps else ""))
    net = model
    if args.compile:
        net = torch.compile(net)
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    log = RunLog(out_dir, dist, config)
    log.keep_until(start)
    stage = os.path.basename(os.path.normpath(out_dir))
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        size = f"{len(loader.ds)} samples {tuple(loader.ds.sample_shape)}" if hasattr(loader, "ds") else "data"
        print(f"[{stage}] {type(model).__name__} {n_params / 1e6:.2f}M parameters ({sum(p.numel() for p in params) / 1e6:.2f}M "
              f"trained) | {size} | steps {start}->{args.steps}, global batch {args.batch_size} | {device}, "
              f"{amp if amp != 'none' else 'fp32'}{', compiled' if args.compile else ''}, {dist.world_size} process(es) | {out_dir}",
              flush=True)
        if args.warmup > args.steps:
            print(f"[{stage}] warning: --warmup {args.warmup} is longer than --steps {args.steps}: the learning rate ends at "
                  f"{args.lr * args.steps / args.warmup:.3g}, never reaching --lr {args.lr}", flush=True)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    ema_buffers, model_buffers = list(ema.buffers()), list(model.buffers())  # e.g. BatchNorm statistics
    loss_sum, n_sum, t0, saved = torch.zeros((), device=device), 0, time.time(), start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * 0.1 ** sum(step >= m for m in args.lr_steps)
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
        # EMA, optionally with a warm-up (Karras-style) that follows the model more closely early on
        decay = min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, model_buffers)
        loss_sum += loss.detach()
        n_sum += 1
        last = step + 1 == args.steps
        if step == start and dist.is_main and not ((step + 1) % args.log_every == 0 or last):  # progress from the start
            dt = time.time() - t0
            print(f"[{stage}] step {step + 1} loss {loss.item():.4g} (not logged) | ETA {_eta((args.steps - step - 1) * dt)}", flush=True)
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
            log.log(rec, prefix=f"[{stage}] ", suffix=f" | ETA {_eta((args.steps - step - 1) * dt / n_sum)}")
            loss_sum, n_sum, t0 = torch.zeros((), device=device), 0, time.time()
            # at the first log step at or past each multiple of --ckpt-every (not only at common multiples of the two)
            if dist.is_main and ((step + 1) // args.ckpt_every > saved // args.ckpt_every or last):
                save_checkpoint(ckpt_dir, model, ema, opt, step + 1, config,
                                extra={"scaler": scaler.state_dict()} if scaler.is_enabled() else None)
                saved = step + 1
    if dist.world_size > 1:
        torch_dist.barrier()
    return model, ema


READS = ("ckpt", "ckpts", "teacher", "encoder_ckpt", "grid", "unet_path", "sd_path")  # flags naming what a stage reads


def check_out_dir(args, resumable=False):
    """Nothing a user has is overwritten unasked. A stage never writes into a folder it reads from (--out-dir must not
    be, hold, or lie inside the checkpoint or grid it reads), and a folder that holds another run (ckpt/, config.json,
    metrics.json) is refused unless --overwrite; resumable stages (training with --resume, diffusion_classifier's
    classify) judge their own folder."""
    out = os.path.realpath(args.out_dir)
    for name in READS:
        paths = getattr(args, name, None)
        for path in ([paths] if isinstance(paths, str) else paths or []):
            real = os.path.realpath(path)
            if real == out or real.startswith(out + os.sep) or out.startswith(real + os.sep):
                raise UserError(f"--out-dir {args.out_dir} and --{name.replace('_', '-')} {path}, which this stage reads, "
                                f"overlap: its outputs would replace what it reads; pass another --out-dir")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UserError("--resume and --overwrite: continue the run in --out-dir, or replace it, not both")
    held = [n for n in ("ckpt", "config.json", "metrics.json") if os.path.exists(os.path.join(out, n))]
    if held and not resumable and not getattr(args, "overwrite", False) and not getattr(args, "resume", False):
        raise UserError(f"--out-dir {args.out_dir} holds another run ({', '.join(held)}): pass --overwrite to replace it, "
                        f"--resume to continue a training run, or another --out-dir")


RESUMABLE = {"steps", "resume", "overwrite", "log_every", "ckpt_every", "device", "compile", "peak_tflops", "out_dir",
             "snapshot_every"}  # flags a resumed run may change: they do not shape the run


# ----------------------------------------------------------------------------------------------
# Metrics: accuracy / F1, a linear probe, FID


def accuracy_f1(pred, target, num_classes):
    """Accuracy, macro-F1 and the confusion matrix (rows: true class, columns: predicted).
    pred, target: (N,) class indices in [0, num_classes). Macro-F1 averages over the classes that occur in
    either. For a binary task's F1 (the positive class's), see `binary_f1`."""
    pred, target = pred.cpu().long(), target.cpu().long()
    cm = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = cm.diag().float()
    f1 = 2 * tp / (cm.sum(0) + cm.sum(1)).float().clamp(min=1)
    present = (cm.sum(1) + cm.sum(0)) > 0
    return (tp.sum() / cm.sum().clamp(min=1)).item(), f1[present].mean().item(), cm


def binary_f1(cm, positive=1):
    """F1 of one class from a confusion matrix (rows: true, columns: predicted): the F1 of a binary task, as
    papers report it (e.g. paper 000's hematoma detection). 0 when the class is never true nor predicted."""
    tp = cm[positive, positive].item()
    denom = cm[positive, :].sum().item() + cm[:, positive].sum().item()
    return 2 * tp / denom if denom else 0.0


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


INCEPTION_DIM = 2048  # clean-fid's Inception pool3 features
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_CACHE = "/tmp"  # where clean-fid looks for (and downloads) it


def inception(path, device, download=True):
    """clean-fid's Inception feature network, from `path` (--inception-path, any file name) or clean-fid's cache,
    downloaded there once if the network allows. Without either: one line that says where to get the file."""
    from cleanfid.inception_torchscript import InceptionV3W
    if path is None:
        path = os.path.join(INCEPTION_CACHE, INCEPTION_FILE)
        if not os.path.exists(path) and download:
            try:
                import urllib.request
                os.makedirs(INCEPTION_CACHE, exist_ok=True)
                with urllib.request.urlopen(INCEPTION_URL, timeout=30) as r, open(path + ".part", "wb") as f:
                    shutil.copyfileobj(r, f)
                os.replace(path + ".part", path)
            except OSError:
                pass
        if not os.path.exists(path):
            raise UserError(f"FID needs Inception weights ({INCEPTION_FILE}, 92 MB) and they are not in {INCEPTION_CACHE} nor "
                            f"downloadable here: fetch {INCEPTION_URL} and pass --inception-path FILE")
    elif not os.path.isfile(path):
        raise UserError(f"--inception-path {path}: no such file (expected {INCEPTION_FILE}, from {INCEPTION_URL})")
    with tempfile.TemporaryDirectory() as d:  # InceptionV3W reads <folder>/inception-2015-12-05.pt: a link of that name
        os.symlink(os.path.abspath(path), os.path.join(d, INCEPTION_FILE))
        try:
            net = InceptionV3W(d, download=False, resize_inside=False)
        except Exception as e:
            raise UserError(f"--inception-path {path}: not clean-fid's TorchScript Inception ({type(e).__name__})") from None
    return net.to(device).eval()


def compute_fid(real, fake, work_dir, device, feature_extractor=None, dist=None, inception_path=None):
    """FID between two uint8 (N, 3, H, W) image sets through clean-fid (PNG folders, its "clean" resize).

    feature_extractor=None uses clean-fid's Inception (`inception`: --inception-path or clean-fid's cache); tests pass a small
    module mapping (N, 3, 299, 299) floats in [0, 255] to (N, D) features. Each set needs more images than D (else its
    covariance is singular and the figure meaningless): refused in one line. Scratch PNGs go to a fresh folder under
    work_dir, removed afterwards. Under torchrun (dist), rank 0 computes and every rank returns its figure."""
    import numpy as np
    from PIL import Image
    from cleanfid import fid as cleanfid
    dim = INCEPTION_DIM
    if feature_extractor is not None:
        with torch.no_grad():
            dim = feature_extractor(torch.zeros(1, 3, 299, 299, device=device)).shape[1]
    for name, imgs in (("reference", real), ("generated", fake)):
        if len(imgs) <= dim:
            raise UserError(f"FID: the {name} set has {len(imgs)} images, but its {dim}-dimensional feature covariance "
                            f"needs more than {dim} (pass --n-fid {dim + 1} or more)")
    score = torch.zeros((), dtype=torch.float64)
    if dist is None or dist.is_main:
        os.makedirs(work_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="fid_", dir=work_dir)
        try:
            model = feature_extractor or inception(inception_path, device)
            stats = []
            for name, imgs in (("real", real), ("fake", fake)):
                d = os.path.join(scratch, name)
                os.makedirs(d)
                for i, im in enumerate(imgs.cpu()):
                    Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(d, f"{i:06d}.png"))
                f = cleanfid.get_folder_features(d, model, num_workers=0, batch_size=32, device=torch.device(device),
                                                 mode="clean", verbose=False)
                stats.append((np.mean(f, axis=0), np.cov(f, rowvar=False)))
            score.fill_(float(cleanfid.frechet_distance(*stats[0], *stats[1])))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if dist is not None and dist.world_size > 1:
        score = score.to(dist.device)
        torch_dist.broadcast(score, 0)
    return float(score)


# ----------------------------------------------------------------------------------------------
# Pictures, drawn with pillow: image grids, heat maps, curves


def _font(size=13):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def _text_size(draw, text, font):
    x0, y0, x1, y1 = draw.textbbox((0, 0), str(text), font=font)
    return x1 - x0, y1 - y0


def _vertical_text(text, font, fill="black"):
    """A text rotated 90 degrees (read bottom to top), as an RGBA image: column labels of any length."""
    from PIL import Image, ImageDraw
    w, h = _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), text, font)
    img = Image.new("RGBA", (w + 4, h + 6), (255, 255, 255, 0))
    ImageDraw.Draw(img).text((2, 0), str(text), fill=fill, font=font)
    return img.rotate(90, expand=True)


def save_image_grid(images, path, nrow=8, captions=None):
    """images: uint8 (N, C, H, W) or float in [-1, 1] -> one PNG grid; small images are enlarged (nearest) to at
    least 64 px so a person can see them; captions: one text per image (its class), drawn under it."""
    from PIL import Image, ImageDraw
    images = (images if images.dtype == torch.uint8 else data.to_uint8(images)).cpu()
    n, c, h, w = images.shape
    scale = max(1, 64 // max(h, w))
    nrow, font = min(nrow, n), _font(11)
    cap_h = 16 if captions else 0
    cw, ch = w * scale + 4, h * scale + 4 + cap_h
    rows = (n + nrow - 1) // nrow
    grid = Image.new("RGB", (nrow * cw, rows * ch), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        r, q = divmod(k, nrow)
        arr = images[k].expand(3, -1, -1) if c == 1 else images[k]
        tile = Image.fromarray(arr.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (q * cw + 2, r * ch + 2))
        if captions:
            text = str(captions[k])
            while len(text) > 1 and _text_size(draw, text, font)[0] > cw - 2:
                text = text[:-1]
            draw.text((q * cw + 2, r * ch + h * scale + 4), text, fill="black", font=font)
    grid.save(path)


def save_heatmap(matrix, path, row_labels, col_labels, title="", fmt=None, vmin=None, vmax=None):
    """A labelled heat map (confusion matrices, probe grids, t histograms) drawn with pillow: full row and (vertical)
    column labels, every cell's value, and a colour bar. The colour scale runs from vmin (default: 0 for data that is
    never negative, so a grid of accuracies does not paint its lowest cell white) to vmax (default: the maximum);
    fmt (default: 3 significant digits) formats the cell values."""
    from PIL import Image, ImageDraw
    m = np.asarray(matrix, dtype=np.float64)
    R, C = m.shape
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (0.0 if finite.size and finite.min() >= 0 else (finite.min() if finite.size else 0.0))
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    fmt = fmt or "{:.3g}"
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max(40, max(_text_size(probe, fmt.format(v), small)[0] for v in m.flat) + 8) if m.size else 40
    left = 12 + max(_text_size(probe, r, font)[0] for r in row_labels)
    col_imgs = [_vertical_text(c, font) for c in col_labels]
    top = 30 + max(im.height for im in col_imgs)
    width = max(left + C * cell + 90, 20 + _text_size(probe, title, font)[0])
    img = Image.new("RGB", (width, top + R * cell + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black", font=font)

    def colour(v):
        t = 0.0 if not np.isfinite(v) or hi == lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
        return (int(255 * (1 - 0.85 * t)), int(255 * (1 - 0.55 * t)), 255)
    for j, im in enumerate(col_imgs):
        img.paste(im, (left + j * cell + (cell - im.width) // 2, top - im.height - 4), im)
    for i in range(R):
        d.text((6, top + i * cell + cell // 2 - 7), str(row_labels[i]), fill="black", font=font)
        for j in range(C):
            v = m[i, j]
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            d.rectangle(box, fill=colour(v), outline=(225, 225, 225))
            text = fmt.format(v) if np.isfinite(v) else "-"
            tw, th = _text_size(d, text, small)
            d.text((box[0] + (cell - tw) // 2, box[1] + (cell - th) // 2 - 2), text,
                   fill="white" if colour(v)[0] < 110 else "black", font=small)
    bx, by, bh = left + C * cell + 18, top, R * cell
    for y in range(bh):  # the colour bar: hi at the top, lo at the bottom
        d.line([bx, by + y, bx + 14, by + y], fill=colour(hi - (hi - lo) * y / max(1, bh - 1)))
    d.text((bx + 18, by - 2), fmt.format(hi), fill="black", font=small)
    d.text((bx + 18, by + bh - 12), fmt.format(lo), fill="black", font=small)
    img.save(path)


def _nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    step *= next(k for k in (1, 2, 2.5, 5, 10) if span / (step * k) <= n)
    return [lo + 0 * step] if step == 0 else [t * step for t in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def save_curve(xs, series, path, xlabel="", ylabel="", title=""):
    """Line plot of one or more series {name: ys} over xs, drawn with pillow: round y ticks with grid lines, an x tick
    at every point (thinned when crowded), the legend outside the frame, on the right."""
    from PIL import Image, ImageDraw
    font, small = _font(13), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 24 + max([_text_size(probe, name, small)[0] for name in series] or [0])
    W, H, pad_l, pad_t, pad_b = 560 + legend_w, 380, 70, 40, 56
    pad_r = legend_w + 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    ys_all = [y for ys in series.values() for y in ys if y is not None and math.isfinite(y)]
    lo, hi = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
    margin = 0.06 * (hi - lo) if hi > lo else (abs(hi) * 0.1 or 1.0)
    lo, hi = lo - margin, hi + margin
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def pt(x, y):
        return pad_l + (x - x_lo) / (x_hi - x_lo) * (W - pad_l - pad_r), H - pad_b - (y - lo) / (hi - lo) * (H - pad_t - pad_b)
    for t in _nice_ticks(lo, hi):
        y = pt(x_lo, t)[1]
        d.line([pad_l, y, W - pad_r, y], fill=(230, 230, 230))
        label = f"{t:.4g}"
        d.text((pad_l - 6 - _text_size(d, label, small)[0], y - 7), label, fill="black", font=small)
    d.rectangle([pad_l, pad_t, W - pad_r, H - pad_b], outline="black")
    d.text((pad_l, 10), title, fill="black", font=font)
    d.text(((pad_l + W - pad_r) // 2 - _text_size(d, xlabel, font)[0] // 2, H - 22), xlabel, fill="black", font=font)
    d.text((8, pad_t - 26), ylabel, fill="black", font=font)
    last = -1e9
    for x in xs:
        px = pt(x, lo)[0]
        label = f"{x:g}"
        tw = _text_size(d, label, small)[0]
        if px - tw / 2 > last + 4:  # skip labels that would overlap the previous one
            d.text((px - tw / 2, H - pad_b + 6), label, fill="black", font=small)
            last = px + tw / 2
        d.line([px, H - pad_b, px, H - pad_b + 4], fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    for k, (name, ys) in enumerate(series.items()):
        c = colours[k % len(colours)]
        pts = [pt(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        ly = pad_t + 8 + 18 * k
        d.line([W - pad_r + 10, ly + 7, W - pad_r + 22, ly + 7], fill=c, width=3)
        d.text((W - pad_r + 26, ly), name, fill="black", font=small)
    img.save(path)
