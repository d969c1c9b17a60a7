"""
RepFusion: distil a diffusion model's features into a student network, with a REINFORCE timestep policy.

Paper: "Diffusion Model as Representation Learner" (Yang & Wang, ICCV 2023, arXiv 2308.10916). A frozen
diffusion network (the teacher) is read at a timestep t: its block feature f_T(x, t) (global-average pooled)
supervises a student (CIFAR ResNet) through a projector, L_feat = || P(f_S(x)) - f_T(x, t) ||^2. Which t is
chosen per image by a policy network pi(t | x) (a LeNet-like CNN, a categorical over t bins), trained with
REINFORCE: the reward is minus the cross-entropy of a small MLP task head that reads f_T(x, t) (the head is
trained with CE alongside), with a moving-average baseline and an entropy bonus decayed linearly to 0.
The distilled student is then fine-tuned on labels and compared with the same student trained from scratch; for the
paper's dense transfers it becomes the context path of a BiSeNetV1 face parser (`--task seg`, mIoU on CelebAMask-HQ)
or the backbone of a top-down heatmap landmark model (`--task landmarks`, NME on WFLW).

    python repfusion.py --out-dir runs/demo                # teacher -> distill -> finetune + scratch on `shapes`, CPU
    python repfusion.py distill --teacher runs/ddae/pretrain --data cifar10 --out-dir runs/rf/distill
    python repfusion.py finetune --ckpt runs/rf/distill/ckpt --labels-per-class 400 --out-dir runs/rf/finetune
    python repfusion.py scratch --student resnet18 --data cifar10 --labels-per-class 400 --out-dir runs/rf/scratch
    torchrun --nproc_per_node=8 repfusion.py distill --teacher ... --t-policy rl --batch-size 128
    python repfusion.py distill --teacher ddpm-cifar10-32 --teacher-layer mid_block.resnets.1.conv2 --data cifar10 ...
    python repfusion.py --task seg --out-dir runs/rf-seg      # the same pipeline, then BiSeNetV1 on shapes-seg (mIoU)
    python repfusion.py --task landmarks --out-dir runs/rf-lm  # ... a heatmap landmark head on shapes-landmarks (NME)
    python repfusion.py finetune --task seg --ckpt runs/rf/distill --data CelebAMask-HQ --out-dir runs/rf/seg

Teachers: a `ddae_probe.py pretrain` checkpoint (DDPM/EDM UNet; any block by name, default `mid`, or a module inside
one), a public UNet (models.load_unet: a diffusers UNet2DModel folder such as google/ddpm-cifar10-32, a guided-diffusion
file such as 64x64_diffusion.pt; official layer names accepted), a `repcond_dit.py` checkpoint or an official DiT .pt
file (DiT; `blocks.i`, default the middle block, tokens mean-pooled).
"""
import argparse
import dataclasses
import json
import math
import os
import time
from functools import partial

from cli import add_common_args, add_train_args, answer_early, HelpFormatter, run, UNet_models


# ----------------------------------------------------------------------------------------------
# The command line: first, and standard library only, so that --help answers before torch loads


STUDENTS = ("resnet18", "resnet50")  # the --student names; Student_models (below) builds them
STEMS = ("cifar", "imagenet")


def add_task_args(q):
    """The downstream task and its head's flags (finetune, scratch and the bare run)."""
    q.add_argument("--task", default="classification", choices=["classification", "seg", "landmarks"],
                   help="classification: linear classifier; seg: BiSeNetV1 around the student (mIoU); landmarks: "
                        "heatmap head on the student (NME)")
    q.add_argument("--head-ch", type=int, default=256, help="landmarks: deconv channels (256: the official head)")
    q.add_argument("--deconvs", type=int, default=3, help="landmarks: deconv layers (3: the official head, heatmaps at 1/4 "
                                                          "of the input with the imagenet stem)")
    q.add_argument("--sigma", type=float, default=2.0, help="landmarks: target Gaussian std in heatmap pixels")
    q.add_argument("--no-flip-test", action="store_true", help="landmarks: no flip test (the official averages it in)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                allow_abbrev=False)  # else a sub-command flag such as --t is "ambiguous" here
    add_common_args(p, "runs/repfusion")
    p.add_argument("--teacher", default=None, help="pipeline: reuse this teacher checkpoint instead of training one")
    p.add_argument("--teacher-steps", type=int, default=600, help="pipeline: teacher pre-training steps")
    p.add_argument("--teacher-ch", type=int, default=16, help="pipeline: the teacher UNet's base width")
    p.add_argument("--teacher-input", default="noised", choices=["noised", "clean"])
    p.add_argument("--steps", type=int, default=400, help="pipeline: distillation steps")
    p.add_argument("--finetune-steps", type=int, default=200, help="pipeline: fine-tune and scratch steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="pipeline: lr of finetune and scratch (default: --lr for classification, 1e-2 for seg and landmarks, "
                        "where 2e-3 leaves the 200-step parsers predicting background)")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--student", default="resnet18", choices=STUDENTS)
    p.add_argument("--width", type=int, default=16, help="pipeline: student base width (64 = the standard ResNet)")
    p.add_argument("--t-policy", default="rl", choices=["rl", "fixed", "random"])
    p.add_argument("--t-bins", type=int, default=10)
    p.add_argument("--feat-loss", default=None, choices=["mse", "at", "rkd"],
                   help="pipeline: the distillation loss (default: at for classification, mse for seg and landmarks). On "
                        "shapes, seeds 0-2, classification: at (attention transfer of the teacher's spatial map) 0.508-0.629 "
                        "vs scratch 0.259-0.421, mse (the pooled feature) 0.291-0.500; seg, seeds 0-1: mse ahead of scratch "
                        "in both, at in one (docs/repfusion.md)")
    p.add_argument("--labels-per-class", type=int, default=10, help="pipeline: the label budget of finetune and scratch")
    add_task_args(p)
    p.set_defaults(head_ch=32)  # the bare run's landmark head: 32 deconv channels on the CPU (256, the official, is --head-ch 256)
    p.add_argument("--labeled-fraction", type=float, default=0.02, help="pipeline, dense tasks: the fraction of training images "
                                                                        "with masks / keypoints for finetune and scratch")
    p.add_argument("--reward-labels", default="all", choices=["all", "budget"],
                   help="pipeline: labels the rl reward reads: all train labels (the paper's setting) or only the budget")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser = partial(sub.add_parser, formatter_class=HelpFormatter)

    q = sub.add_parser("distill", help="distil the teacher's features into the student (with the t policy)")
    add_common_args(q, "runs/repfusion/distill", test=False)
    # the official schedule: 200 epochs of CIFAR-10 at batch 128, SGD 0.1 (momentum 0.9, wd 1e-4) x0.1 at epochs 100, 150
    add_train_args(q, steps=78_000, batch_size=128, lr=0.1, grad_clip=0.0, optimizer="sgd", weight_decay=1e-4,
                   lr_steps=(39_000, 58_500))
    q.set_defaults(ema_decay=0.999)  # the official EMAHook(momentum=0.001)
    q.add_argument("--teacher", required=True, help="a ddae_probe.py or repcond_dit.py run (OUT_DIR or OUT_DIR/ckpt), an "
                                                   "official DiT .pt file, or a public UNet: a diffusers UNet2DModel folder "
                                                   "(google/ddpm-cifar10-32) or a guided-diffusion .pt file (64x64_diffusion.pt)")
    q.add_argument("--teacher-layer", default=None,
                   help="block name (UNet: down.i | mid | up.i or a module inside one such as mid.block2.conv2, official "
                        "diffusers / guided-diffusion paths too; default: mid_block.resnets.1.conv2 for a diffusers "
                        "folder (the official teacher feature), else mid; DiT: blocks.i, default the middle one)")
    q.add_argument("--teacher-input", default="clean", choices=["noised", "clean"],
                   help="clean: x0 with t (the released code that produced 95.38%%); noised: x_t = sqrt(abar_t) x0 + "
                        "sqrt(1 - abar_t) eps (the paper's text)")
    q.add_argument("--student", default="resnet18", choices=STUDENTS)
    q.add_argument("--width", type=int, default=64, help="student base width (64: the standard ResNet)")
    q.add_argument("--stem", default="cifar", choices=STEMS, help="cifar: 3x3 stride 1 (32 px inputs); imagenet: 7x7 stride 2 + "
                                                               "max-pool (the official dense students, 256 px faces)")
    q.add_argument("--feat-loss", default="mse", choices=["mse", "at", "rkd"])
    q.add_argument("--feat-weight", type=float, default=None, help="feature loss weight (default, official: mse 1, at 1000, "
                                                                    "rkd 1 on distance 25 + angle 50)")
    q.add_argument("--t-policy", default="rl", choices=["rl", "fixed", "random"])
    q.add_argument("--t", type=int, default=10, help="fixed: the timestep")
    q.add_argument("--t-bins", type=int, default=1000, help="the policy's categorical: bins over [0, t_max)")
    q.add_argument("--t-max", type=int, default=None, help="t ranges over [0, t_max) (default: the teacher's T)")
    q.add_argument("--entropy-coef", type=float, default=0.1)
    q.add_argument("--entropy-decay-steps", type=int, default=None, help="entropy bonus reaches 0 here (default: steps / 2)")
    q.add_argument("--baseline", default="none", choices=["none", "ema"],
                   help="REINFORCE baseline: none (the official code: advantage = reward) or a moving average")
    q.add_argument("--baseline-momentum", type=float, default=0.9, help="--baseline ema: its momentum")
    q.add_argument("--head-hidden", type=int, default=None, help="task head width (default: the teacher feature's, 256 "
                                                                   "for google/ddpm-cifar10-32, as the official 256-256-K MLP)")
    q.add_argument("--head-layernorm", action="store_true", help="LayerNorm the teacher feature before the task head (not official)")
    q.add_argument("--policy-zero-init", action="store_true", help="start the policy uniform (zero last layer; not official)")
    q.add_argument("--hist-every", type=int, default=None, help="steps per row of the t histogram (default: steps / 10)")
    q.add_argument("--labels-per-class", type=int, default=None, help="labels the task head may read (default: all)")
    q.add_argument("--labeled-fraction", type=float, default=None)
    q.add_argument("--no-augment", action="store_true")

    for name, hlp in (("finetune", "fine-tune the distilled student on labels (classification, seg or landmarks)"),
                      ("scratch", "the same model from scratch, same labels")):
        q = sub.add_parser(name, help=hlp)
        add_common_args(q, f"runs/repfusion/{name}", data=name == "scratch")
        # official: 200 epochs of 50k at batch 64, SGD 0.1 with Nesterov momentum, wd 1e-4, x0.1 at epochs 100 and 150
        add_train_args(q, steps=156_250, batch_size=64, lr=0.1, grad_clip=0.0, optimizer="sgd", weight_decay=1e-4, nesterov=True,
                       lr_steps=(78_125, 117_188))
        add_task_args(q)
        if name == "finetune":
            q.add_argument("--ckpt", required=True, help="a distill checkpoint folder (OUT_DIR/ckpt)")
            q.add_argument("--image-size", type=int, default=None,
                           help="dense tasks: image size (default the data's: CelebAMask-HQ 512, WFLW crops 256)")
        else:
            q.add_argument("--student", default="resnet18", choices=STUDENTS)
            q.add_argument("--width", type=int, default=64)
            q.add_argument("--stem", default="cifar", choices=STEMS, help="the ResNet stem (dense tasks on faces: imagenet)")
        q.add_argument("--labels-per-class", type=int, default=None)
        q.add_argument("--labeled-fraction", type=float, default=None, help="the fraction of training labels (dense: of images) used")
        q.add_argument("--no-augment", action="store_true")
    return p


if __name__ == "__main__":
    answer_early(build_parser())  # --help, or a line argparse refuses, answered before the imports below

# the method's imports (torch takes about 2 s)
import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

import data
from data import UserError
from training import (all_sum, autocast, check_out_dir, cleanup_distributed, compile_default, draw_global,
                      find_checkpoint, fit, linear_probe, load_json, load_state_dict_strict, load_weights, resolve_amp,
                      RunLog, save_heatmap, save_image_grid, save_json, setup_distributed, step_generator)
from models import checkpoint_kind, Diffusion, load_run, load_unet, make_objective, UNet, unet_file_kind
from vae import Space


# ----------------------------------------------------------------------------------------------
# Models: the student (CIFAR ResNet-18/50), the policy (LeNet-like), the task head


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, ch, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = None
        if stride != 1 or in_ch != ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, ch, stride=1):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet with four stages of widths w, 2w, 4w, 8w (w = 64 is the standard ResNet-18/50) at strides 1, 2, 2, 2
    after the stem. stem "cifar" (for 32x32 inputs): 3x3 stride-1 conv, no max-pool, stage outputs at 1, 1/2, 1/4,
    1/8; stem "imagenet" (torchvision's, the official dense students'): 7x7 stride-2 conv and a 3x3 stride-2
    max-pool, stage outputs at 1/4 ... 1/32. Parameter names follow torchvision (conv1, bn1, layerK.i.conv1,
    downsample.0, fc) for both stems. num_classes = 0: no fc, forward returns the pooled layer4 feature (N, 8w * expansion)."""
    def __init__(self, block, layers, width=64, in_channels=3, num_classes=0, stem="cifar"):
        super().__init__()
        if stem not in STEMS:
            raise UserError(f"--stem {stem}: expected one of {', '.join(STEMS)}")
        self.stem = stem
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False) if stem == "cifar" else \
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cur, stages, self.stage_channels = width, [], []
        for i, n in enumerate(layers):
            ch, blocks = width * 2 ** i, []
            for j in range(n):
                blocks.append(block(cur, ch, stride=2 if (i > 0 and j == 0) else 1))
                cur = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
            self.stage_channels.append(cur)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = cur
        self.fc = nn.Linear(cur, num_classes) if num_classes > 0 else None
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        """-> the four stage outputs [(N, w, H, W), (N, 2w, H/2, W/2), (N, 4w, H/4, W/4), (N, 8w, H/8, W/8)] (x expansion)"""
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x):
        h = self.forward_features(x)[-1].mean(dim=(2, 3))  # (N, D)
        return h if self.fc is None else self.fc(h)


Student_models = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
STAGE_STRIDES = {"cifar": (1, 2, 4, 8), "imagenet": (4, 8, 16, 32)}


def build_student(name, width=64, in_channels=3, num_classes=0, stem="cifar"):
    block, layers = Student_models[name]
    return ResNet(block, layers, width, in_channels, num_classes, stem)


class PolicyNet(nn.Module):
    """pi(t | x): the official PolicyNet_Cov, LeNet-5 (conv 5x5 x6 unpadded, pool 2, conv 5x5 x16 unpadded, pool 2,
    fc 120, fc 84, fc n_bins) reading the clean image, with PyTorch's default init; returns the logits of the
    categorical over n_bins timestep bins (the official net ends in a softmax; Categorical(probs) is the same law).
    At 32x32 the conv stack gives 16 x 5 x 5 exactly; other sizes are average-pooled to 5 x 5. zero_init=True starts
    the policy uniform (the paper's text: "at first t is randomly selected")."""
    def __init__(self, in_channels, n_bins, zero_init=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, n_bins)
        if zero_init:
            nn.init.zeros_(self.fc3.weight)
            nn.init.zeros_(self.fc3.bias)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, (H-4)/2, (W-4)/2): 14 x 14 at 32
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5) at 32
        x = F.adaptive_avg_pool2d(x, 5).flatten(1)  # (N, 400)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))  # (N, n_bins)


class TaskHead(nn.Module):
    """The MLP that classifies the teacher feature f_T(x, t); its CE is the policy's (negative) reward. Official
    (repfusion.py's task_head): Linear(d, hidden), ReLU, Linear(hidden, hidden), ReLU, Linear(hidden, K) on the raw
    pooled feature, hidden = d (256 for google/ddpm-cifar10-32's mid block). layernorm=True puts a LayerNorm first
    (features of different t differ in scale)."""
    def __init__(self, dim, num_classes, hidden=256, layernorm=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if layernorm else nn.Identity()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes)

    def forward(self, f):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(self.norm(f))))))  # (N, K)


# ----------------------------------------------------------------------------------------------
# Dense models around the student: BiSeNetV1 (face parsing) and a top-down heatmap head (landmarks). Module and
# parameter names follow mmseg's BiSeNetV1 / FCNHead and mmpose's TopdownHeatmapSimpleHead.


class ConvModule(nn.Sequential):
    """mmcv's ConvModule: conv (no bias before a norm), BatchNorm, optional ReLU; keys conv.*, bn.*."""
    def __init__(self, cin, cout, k, stride=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        if act:
            self.activate = nn.ReLU(inplace=True)


class SpatialPath(nn.Module):
    """BiSeNet's spatial path: conv 7x7, conv 3x3, conv 3x3, conv 1x1, each with BN and ReLU. Its output must sit at
    the resolution of the context path's layer2 map: strides (2, 2, 2) = 1/8 with the ImageNet stem (the official),
    (2, 1, 1) = 1/2 with the CIFAR stem (same parameters)."""
    def __init__(self, cin, chs, strides):
        super().__init__()
        self.layer1 = ConvModule(cin, chs[0], 7, strides[0])
        self.layer2 = ConvModule(chs[0], chs[1], 3, strides[1])
        self.layer3 = ConvModule(chs[1], chs[2], 3, strides[2])
        self.layer4 = ConvModule(chs[2], chs[3], 1)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class AttentionRefinementModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv_layer = ConvModule(cin, cout, 3)
        self.atten_conv_layer = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cout, cout, 1, act=False), nn.Sigmoid())

    def forward(self, x):
        x = self.conv_layer(x)
        return x * self.atten_conv_layer(x)  # channel attention from the pooled feature


class ContextPath(nn.Module):
    """The student ResNet (`backbone`) with attention refinement of its 1/16 and 1/32 maps (layer3, layer4) and a
    global-context vector; -> (context at layer2's resolution, context at layer3's), both c0 channels."""
    def __init__(self, backbone, c0):
        super().__init__()
        _, _, c3, c4 = backbone.stage_channels
        self.backbone = backbone
        self.arm16, self.arm32 = AttentionRefinementModule(c3, c0), AttentionRefinementModule(c4, c0)
        self.conv_head32, self.conv_head16 = ConvModule(c0, c0, 3), ConvModule(c0, c0, 3)
        self.gap_conv = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(c4, c0, 1))

    def forward(self, x):
        _, x_8, x_16, x_32 = self.backbone.forward_features(x)
        x_32_sum = self.arm32(x_32) + self.gap_conv(x_32)  # (N, c0, h/32, w/32) + (N, c0, 1, 1)
        x_32_up = self.conv_head32(F.interpolate(x_32_sum, size=x_16.shape[2:], mode="nearest"))  # (N, c0, h/16, w/16)
        x_16_sum = self.arm16(x_16) + x_32_up
        x_16_up = self.conv_head16(F.interpolate(x_16_sum, size=x_8.shape[2:], mode="nearest"))  # (N, c0, h/8, w/8)
        return x_16_up, x_32_up


class FeatureFusionModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvModule(cin, cout, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv_atten = nn.Sequential(ConvModule(cout, cout, 1), nn.Sigmoid())

    def forward(self, x_sp, x_cp):
        fuse = self.conv1(torch.cat([x_sp, x_cp], dim=1))
        return fuse * self.conv_atten(self.gap(fuse)) + fuse


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv (num_convs=1, concat_input=False): conv 3x3 + BN + ReLU, Dropout2d(0.1), 1x1
    classifier (normal(0, 0.01) init, as BaseDecodeHead)."""
    def __init__(self, cin, ch, num_classes, dropout=0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, ch, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(ch, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.convs(x)))


class BiSeNetV1(nn.Module):
    """BiSeNetV1 (Yu et al. 2018) as mmseg builds it (configs/_base_/models/bisenetv1_r18-d32.py, the RepFusion face
    parser): the student ResNet is the context path's backbone. All widths follow from the ResNet's layer2 width c0
    (128 for ResNet-18, 512 for ResNet-50 at w = 64, which gives the official configs exactly): spatial path
    (c0/2, c0/2, c0/2, c0), fusion and decode head 2 c0, two auxiliary FCN heads of c0/2 on the two context maps
    (loss weight 1 each, as the configs). forward -> (main logits, aux logits on the layer2-resolution context,
    aux logits on the layer3-resolution context), each (N, num_classes, h', w'); the loss upsamples them (bilinear)."""
    def __init__(self, backbone, num_classes):
        super().__init__()
        c0 = backbone.stage_channels[1]
        strides = (2, 2, 2) if backbone.stem == "imagenet" else (2, 1, 1)
        self.context_path = ContextPath(backbone, c0)
        self.spatial_path = SpatialPath(backbone.conv1.in_channels, (c0 // 2, c0 // 2, c0 // 2, c0), strides)
        self.ffm = FeatureFusionModule(2 * c0, 2 * c0)
        self.decode_head = FCNHead(2 * c0, 2 * c0, num_classes)
        self.auxiliary_head = nn.ModuleList([FCNHead(c0, c0 // 2, num_classes), FCNHead(c0, c0 // 2, num_classes)])

    @property
    def backbone(self):
        return self.context_path.backbone

    def forward(self, x):
        x_context8, x_context16 = self.context_path(x)
        x_fuse = self.ffm(self.spatial_path(x), x_context8)  # (N, 2 c0, h/8, w/8)
        return (self.decode_head(x_fuse), self.auxiliary_head[0](x_context8), self.auxiliary_head[1](x_context16))


class TopdownHeatmapSimpleHead(nn.Module):
    """mmpose's TopdownHeatmapSimpleHead (SimpleBaseline, Xiao et al. 2018): `deconvs` x (ConvTranspose2d 4x4 stride 2,
    BN, ReLU) of `ch` channels, then a 1x1 conv to one heatmap per keypoint. The official: 3 deconvs of 256 on
    the last ResNet map (1/32 -> 1/4 of the 256-pixel input, 64 x 64 heatmaps); normal(0, 0.001) init."""
    def __init__(self, cin, num_keypoints, ch=256, deconvs=3):
        super().__init__()
        layers = []
        for i in range(deconvs):
            layers += [nn.ConvTranspose2d(cin if i == 0 else ch, ch, 4, 2, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(ch if deconvs else cin, num_keypoints, 1)
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.001)
        nn.init.zeros_(self.final_layer.bias)

    def forward(self, x):
        return self.final_layer(self.deconv_layers(x))


class TopDown(nn.Module):
    """mmpose's TopDown landmark model: the student ResNet (`backbone`) and the heatmap head on its last map.
    forward: (N, C, H, W) -> heatmaps (N, K, H * 2^deconvs / stride, ...)."""
    def __init__(self, backbone, num_keypoints, ch=256, deconvs=3):
        super().__init__()
        self.backbone = backbone
        self.keypoint_head = TopdownHeatmapSimpleHead(backbone.stage_channels[-1], num_keypoints, ch, deconvs)

    def forward(self, x):
        return self.keypoint_head(self.backbone.forward_features(x)[-1])


# ----------------------------------------------------------------------------------------------
# Feature losses


def attention_map(f, p=2):
    """Attention transfer's spatial map: mean over channels of |f|^p, (N, C, H, W) -> (N, H, W)."""
    return f.float().abs().pow(p).mean(1)


def at_loss(fs, ft):
    """Attention transfer (Zagoruyko & Komodakis): L2-normalised attention maps should agree. As RepFusion's
    losses/at.py, the student's feature map is resized (bilinear) to the teacher's resolution before its attention
    map is taken; maps have no channels, so no projector."""
    if fs.shape[-2:] != ft.shape[-2:]:
        fs = F.interpolate(fs.float(), size=ft.shape[-2:], mode="bilinear", align_corners=False)
    a_s, a_t = attention_map(fs), attention_map(ft)
    return (F.normalize(a_s.flatten(1), dim=1) - F.normalize(a_t.flatten(1), dim=1)).pow(2).mean()


def _pdist(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def rkd_loss(s, t, w_dist=25.0, w_angle=50.0):
    """Relational KD (Park et al.): distance-wise (pairwise distances over their mean) and angle-wise (cosines of
    the angles of every triplet) relations of the batch, smooth-L1; weights 25 and 50 as RepFusion's losses/rkd.py.
    Relations are dimension-free, so the student's pooled feature is used as is (no projector)."""
    s, t = s.float(), t.float()
    with torch.no_grad():
        td = _pdist(t)
        td = td / (td.sum() / (td > 0).sum().clamp(min=1))  # mean over pairs, without a host sync
        te = F.normalize(t[None] - t[:, None], p=2, dim=2)
        ta = torch.bmm(te, te.transpose(1, 2)).flatten()
    sd = _pdist(s)
    sd = sd / (sd.sum() / (sd > 0).sum().clamp(min=1)).detach()
    se = F.normalize(s[None] - s[:, None], p=2, dim=2)
    sa = torch.bmm(se, se.transpose(1, 2)).flatten()
    return w_dist * F.smooth_l1_loss(sd, td) + w_angle * F.smooth_l1_loss(sa, ta)


FEAT_WEIGHT = {"mse": 1.0, "at": 1000.0, "rkd": 1.0}  # the official kd_weight: AT 1000 (unit maps: raw loss ~1/HW), RKD 1


# ----------------------------------------------------------------------------------------------
# The policy: sampling reproducibly, REINFORCE with a moving-average baseline and an entropy bonus


def sample_categorical(probs, u):
    """Inverse-CDF draw, one per row of probs (N, K), from uniforms u (N,): reproducible from (seed, step)."""
    cdf = probs.float().cumsum(1)
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1).contiguous()).squeeze(1).clamp(max=probs.shape[1] - 1)


def reinforce_loss(logits, actions, advantage, entropy_coef, weight=None):
    """REINFORCE: -E[A * log pi(a | x)] - beta * H(pi(. | x)). advantage (N,) = reward - baseline (no grad);
    weight (N,) optionally masks and rescales samples (the policy-gradient term only). -> (loss, entropy)"""
    logp = F.log_softmax(logits.float(), dim=1)
    entropy = -(logp.exp() * logp).sum(1)  # (N,)
    pg = advantage.detach() * logp.gather(1, actions[:, None]).squeeze(1)
    pg = pg.mean() if weight is None else (pg * weight).sum()
    return -pg - entropy_coef * entropy.mean(), entropy


def entropy_coef(step, coef, decay_steps):
    """The paper's schedule: beta decays linearly from `coef` (0.1) to 0 at `decay_steps` (epoch 100 of 200)."""
    return coef * max(0.0, 1.0 - step / max(1, decay_steps))


def pick_timesteps(policy, x, kind, u_pick, u_bin, n_bins, t_max, t_fixed):
    """Which t each image is distilled at (paper Sec. 4.2: a policy pi(t | x) picks it; `random` and `fixed` are
    its ablations). x: (N, C, H, W); u_pick, u_bin: (N,) uniforms in [0, 1) (drawn for the global batch, so the
    choice is reproducible). The categorical is over n_bins equal bins of [0, t_max); t is uniform inside its bin.
    -> (t_bin (N,) long in [0, n_bins), t (N,) long in [0, t_max))"""
    if kind == "rl":
        # the action only, without gradient: the teacher needs t before the student's forward. The policy runs a
        # second time inside RepFusion.forward, under DDP, for the log-probabilities that REINFORCE differentiates
        with torch.no_grad():
            t_bin = sample_categorical(F.softmax(policy(x).float(), dim=1), u_pick)
    elif kind == "random":
        t_bin = (u_pick * n_bins).long().clamp(max=n_bins - 1)
    else:
        t_bin = torch.full((len(x),), t_fixed * n_bins // t_max, dtype=torch.long, device=x.device)
    t = torch.full_like(t_bin, t_fixed) if kind == "fixed" else ((t_bin + u_bin) * (t_max / n_bins)).long().clamp(max=t_max - 1)
    return t_bin, t


def distill_objective(out, t_bin, w, advantage, feat_weight, beta):
    """RepFusion's loss for one batch (paper Sec. 4.1-4.2), from RepFusion.forward's `out`:

        L = feat_weight * L_feat(P(f_S(x)), f_T(x_t, t))            distillation at the chosen t
            + sum_i w_i CE(head(f_T(x_i, t_i)), y_i)                  the task head that defines the reward
            - sum_i w_i A_i log pi(t_i | x_i) - beta * H(pi(. | x))   REINFORCE, A = reward - baseline

    w: (N,) weights of the labeled samples (None without a policy), advantage: (N,) (no gradient), beta: the
    entropy bonus of this step. -> scalar"""
    loss = feat_weight * out["feat"]
    if "head_ce" in out:
        loss = loss + (out["head_ce"] * w).sum()
        if "logits" in out:
            pg, _ = reinforce_loss(out["logits"], t_bin, advantage, beta, weight=w)
            loss = loss + pg
    return loss


HIST_ROWS = 10  # the t histogram is kept per tenth of the run (rows of t_hist.png)


class RepFusion(nn.Module):
    """What distillation trains, as one module for fit/DDP/EMA/checkpoints: student, projector, policy, task head.

    forward(x, y, t_bin, f_t, m_t) returns the feature loss and, per sample, the head's CE and the policy's
    logits; the frozen teacher runs outside (its f_t, m_t come in). Buffers hold what exact resume needs:
    the baseline and the histogram of chosen t bins (rows: tenths of the run)."""
    def __init__(self, cfg):
        super().__init__()
        self.feat_loss, self.at_stage = cfg["feat_loss"], cfg.get("at_stage", 3)
        self.student = build_student(cfg["student"], cfg["width"], cfg["sample_shape"][0], stem=cfg.get("stem", "cifar"))
        self.projector = nn.Linear(self.student.feature_dim, cfg["teacher_dim"]) if cfg["feat_loss"] == "mse" else None
        self.policy = PolicyNet(cfg["sample_shape"][0], cfg["t_bins"], cfg.get("policy_zero_init", False)) \
            if cfg["t_policy"] == "rl" else None
        self.head = TaskHead(cfg["teacher_dim"], cfg["num_classes"], cfg["head_hidden"] or cfg["teacher_dim"],
                             cfg.get("head_layernorm", False)) if cfg["t_policy"] == "rl" else None
        self.register_buffer("baseline", torch.zeros(2))  # (value, number of updates)
        self.register_buffer("t_hist", torch.zeros(HIST_ROWS, cfg["t_bins"], dtype=torch.float64))

    def forward(self, x, y, f_t, m_t):
        maps = self.student.forward_features(x)
        s = maps[-1].mean(dim=(2, 3))  # (N, D_s)
        if self.feat_loss == "mse":
            feat = F.mse_loss(self.projector(s).float(), f_t.float())
        elif self.feat_loss == "at":
            feat = at_loss(maps[self.at_stage], m_t)
        else:
            feat = rkd_loss(s, f_t)
        out = {"feat": feat}
        if self.head is not None:
            logits = self.head(f_t.float()).float()
            out["head_ce"] = F.cross_entropy(logits, y.clamp(min=0), reduction="none")  # (N,)
            out["head_pred"] = logits.argmax(1).detach()
        if self.policy is not None:
            out["logits"] = self.policy(x)  # (N, n_bins)
        return out


# ----------------------------------------------------------------------------------------------
# Teachers: a frozen diffusion network read at timestep t


class Teacher:
    """teacher(x, t, eps) -> (pooled (N, D), map (N, C, h, w)) of one block, the network fed x_t
    (`noised`, the paper's reading) or the clean image with the timestep t (`clean`, the official code).
    t is an integer in [0, T); the network never trains: requires_grad False, eval mode."""
    kind, layer, dim, map_shape, T, net, space = None, None, 0, None, 1000, None, None

    def check_images(self, sample_shape, flag, name):
        """Refuse, in one line, images (C, H, W) that the teacher's Space would not turn into the input size its
        network was trained on (the noise it draws has that size)."""
        if self.space is None:
            return
        _, H, W = sample_shape
        f = self.space.vae.downsample_factor if self.space.kind == "vae" else 1
        if (H // f, W // f) != tuple(self.space.sample_shape[1:]):
            raise UserError(f"{flag}: the data's images are {H}x{W}, but the teacher {name} takes {tuple(self.space.sample_shape)} "
                            f"inputs{' (latents of 1/%d the size)' % f if f > 1 else ''}; pass the teacher's image size")

    def freeze(self):
        self.net.requires_grad_(False).eval()
        return self

    def compile(self):
        """torch.compile the frozen forward (CUDA): the teacher costs more than the student's training step. A
        teacher whose feature a hook keeps (a module inside a block) runs eagerly."""
        if getattr(self, "_out", None) is None:
            self.net = torch.compile(self.net)

    def probe_shape(self, sample_shape, device):
        x = torch.zeros(2, *sample_shape, device=device)
        f, m = self(x, torch.zeros(2, dtype=torch.long, device=device), None)
        self.dim, self.map_shape = f.shape[1], tuple(m.shape[1:])


class DiTTeacher(Teacher):
    """A repcond_dit.py / diffusion_classifier.py checkpoint or an official DiT .pt file: the denoiser's block
    `blocks.i` (tokens (N, T, D) -> mean over tokens; the map is the tokens on their grid). The blocks after it are
    dropped. A representation-conditioned DiT gets r from its encoder on the clean z0, as in its pre-training; a
    label-conditioned one (the official DiTs) gets the null label. An official file runs on --data (latents, or
    images with --vae-path), with DiT's linear schedule over T = 1000."""
    kind = "dit"

    def __init__(self, ckpt, layer, input_mode, device, vae_path=None, data_spec=None, image_size=None):
        model, cfg, _, self.space = load_run(ckpt, device, vae_path, data_spec, kinds=("dit",), official_dit=True,
                                             flag="--teacher", image_size=image_size)
        depth = len(model.denoiser.blocks)
        layer = layer or f"blocks.{depth // 2}"
        names = [f"blocks.{i}" for i in range(depth)]
        if layer not in names:
            raise UserError(f"--teacher-layer {layer}: not a block of this DiT (blocks.0 .. blocks.{depth - 1})")
        k = names.index(layer)
        model.denoiser.blocks = model.denoiser.blocks[:k + 1]  # nothing after the tapped block is needed
        self.net, self.layer, self.input_mode, self.cfg = model, layer, input_mode, cfg
        self.diffusion, self.T = Diffusion(cfg["T"], device=device), cfg["T"]
        self._out = None
        model.denoiser.blocks[k].register_forward_hook(lambda m, i, o: setattr(self, "_out", o))
        self.freeze()

    @torch.no_grad()
    def __call__(self, x, t, eps):
        z0 = self.space.encode(x, generator=False)
        z_in = self.diffusion.q_sample(z0, t, eps) if self.input_mode == "noised" and eps is not None else z0
        den = self.net.denoiser
        y = torch.full_like(t, den.num_classes) if den.num_classes > 0 else None
        self.net(z_in, t, z0=z0, y=y)
        tok = self._out.float()  # (N, T, D)
        h = int(round(tok.shape[1] ** 0.5))
        return tok.mean(1), tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], h, h)

    def noise_shape(self, x):
        return self.space.sample_shape


OFFICIAL_TEACHER_LAYER = "mid_block.resnets.1.conv2"  # the mid block's second resnet, residual branch before the skip add


class UNetTeacher(Teacher):
    """A ddae_probe.py checkpoint (DDPM or EDM UNet) or a public UNet (models.load_unet: a diffusers UNet2DModel
    folder such as google/ddpm-cifar10-32, a guided-diffusion file such as 64x64_diffusion.pt; run on --data with the
    file's own schedule, a class-conditional one without label embedding): block `down.i` / `mid` / `up.i` (default
    `mid`, as the official release) or a module inside one (`mid.block2.conv2`; official names such as diffusers'
    `mid_block.resnets.1.conv2` or guided-diffusion's `middle_block.2.out_layers.3` translate), global-average
    pooled; the forward stops at that block. For an EDM teacher the policy's integer t is mapped to the
    VP-equivalent noise level sigma_t = sqrt((1 - abar_t) / abar_t) of the DDPM linear schedule with T = 1000
    (t = 11 ~ sigma 0.05), so t means the same for both objectives."""
    kind = "ddae"

    def __init__(self, ckpt, layer, input_mode, device, vae_path=None, data_spec=None, image_size=None):
        if unet_file_kind(ckpt):
            if data_spec is None:
                raise UserError(f"--teacher {ckpt}: a public UNet needs --data (the images it reads)")
            net, cfg = load_unet(ckpt, device)
            self.space = Space(data.load(data_spec, "train", image_size), vae_path, device, resolve_amp("auto", device))
            if tuple(self.space.sample_shape) != tuple(cfg["sample_shape"]):
                raise UserError(f"--data {data_spec}: images are {tuple(self.space.sample_shape)}, the UNet {ckpt} takes "
                                f"{tuple(cfg['sample_shape'])} (--image-size)")
        else:
            net, cfg, _, self.space = load_run(ckpt, device, vae_path, data_spec, kinds=("unet",))
        obj = make_objective(cfg, device)
        names = net.layer_names()
        if layer is None and unet_file_kind(ckpt) == "diffusers" and "mid" in names:
            layer = OFFICIAL_TEACHER_LAYER  # the released configs' teacher_layers with google/ddpm-cifar10-32
        layer = net.resolve_layer(layer, "--teacher-layer") if layer else ("mid" if "mid" in names else names[len(names) // 2])
        block = net.block_of(layer)
        if block is None:
            raise UserError(f"--teacher-layer {layer}: outside the blocks (one of {', '.join(names)}, or a module inside one)")
        self.net, self.obj, self.layer, self.input_mode, self.cfg = net.truncated(block), obj, layer, input_mode, cfg
        self._out = None
        if layer != block:  # a module inside the block: its output, kept by a hook, is the feature
            self.net.get_submodule(layer).register_forward_hook(lambda m, i, o: setattr(self, "_out", o))
        self.T = obj.T if obj.kind == "ddpm" else 1000
        if obj.kind == "edm":
            abar = Diffusion(1000, device=device).alphas_cumprod
            self.sigmas = ((1 - abar) / abar).sqrt()
        self.freeze()

    def level(self, t):
        return t if self.obj.kind == "ddpm" else self.sigmas[t]

    @torch.no_grad()
    def __call__(self, x, t, eps):
        z0 = self.space.encode(x, generator=False)
        lv = self.level(t)
        if self.input_mode == "noised" and eps is not None:
            x_in, cond = self.obj.net_input(z0, lv, eps)
        elif self.obj.kind == "ddpm":
            x_in, cond = z0, t.float()  # the official release: the clean image, conditioned on t
        else:
            x_in, cond = self.obj.net_input(z0, lv, None)  # EDM's input scaling c_in(sigma) z0, no noise
        m = self.net(x_in, cond).float()  # (N, C, h, w)
        if self._out is not None:
            m = self._out.float()  # (N, C, h, w) of the hooked module inside the block
        return m.mean(dim=(2, 3)), m

    def noise_shape(self, x):
        return self.space.sample_shape


def teacher_kind(path):
    """'ddae' | 'dit' for a checkpoint folder (OUT_DIR or OUT_DIR/ckpt), a public UNet (diffusers folder or
    guided-diffusion file: 'ddae') or an official DiT file, or one clear error."""
    if not os.path.exists(path):
        raise UserError(f"--teacher {path}: no such checkpoint folder or file")
    if unet_file_kind(path):
        return "ddae", path
    if os.path.isfile(path):
        return "dit", path  # an official DiT .pt (load_dit says in one line if it is not one)
    d = find_checkpoint(path)
    cfg = load_json(os.path.join(d, "config.json"))
    kind = checkpoint_kind(cfg)
    if kind == "unet" and cfg.get("objective") in ("ddpm", "edm"):
        return "ddae", d
    if kind == "dit":
        return "dit", d
    raise UserError(f"--teacher {path}: not a ddae_probe.py or repcond_dit.py checkpoint nor a diffusers UNet2DModel folder "
                    f"(its config.json has stage {cfg.get('stage')!r}, model {cfg.get('model', cfg.get('student'))!r})")


def load_teacher(path, layer=None, input_mode="noised", device="cpu", vae_path=None, data_spec=None, image_size=None):
    kind, d = teacher_kind(path)
    cls = UNetTeacher if kind == "ddae" else DiTTeacher
    return cls(d, layer, input_mode, torch.device(device), vae_path, data_spec, image_size)


# ----------------------------------------------------------------------------------------------
# Helpers: label budgets, distributed sums, evaluation


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the GLOBAL batch's statistics under DDP on the CPU, where nn.SyncBatchNorm refuses to run:
    per-channel sums are all-reduced over the ranks (differentiably, so the backward pass is the global batch's
    too). N gloo ranks then normalise, train and update running statistics exactly as one process would."""
    def forward(self, x):
        if not (self.training and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        s = all_reduce(torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / x.shape[1])]))
        n = s[-1].detach()
        mean = s[:-1] / n
        var = all_reduce((x - mean[:, None, None]).pow(2).sum((0, 2, 3))) / n
        with torch.no_grad():  # as nn.BatchNorm2d: momentum update, unbiased variance
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        return (x - mean[:, None, None]) * (torch.rsqrt(var + self.eps) * self.weight)[:, None, None] + self.bias[:, None, None]


def for_device(model, dist):
    """CUDA: channels_last (conv nets), and SyncBatchNorm under DDP (same parameter names). CPU under DDP (gloo):
    GlobalBatchNorm2d, the same statistics by hand; without either, each rank normalises by its own shard."""
    if dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if dist.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif dist.world_size > 1:
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d  # same parameters and buffers, so checkpoints are unchanged
    return model


def label_budget(ds, labels_per_class, fraction, seed):
    """(the labeled subset, a copy of ds whose labels outside it are -1). The subset is data.labeled_subset's."""
    if labels_per_class is None and fraction is None:
        return ds, ds
    sub = data.labeled_subset(ds, labels_per_class=labels_per_class, fraction=fraction, seed=seed)
    idx = labeled_indices(ds, labels_per_class, fraction, seed)
    masked = ds.labels.clone().fill_(-1)
    masked[idx] = ds.labels[idx]
    return sub, dataclasses.replace(ds, labels=masked)


def labeled_indices(ds, labels_per_class, fraction, seed):
    """The indices of data.labeled_subset's choice: the same call on a stand-in whose "images" are the indices."""
    stand_in = data.Dataset(torch.arange(len(ds)), ds.labels, ds.classes)
    return data.labeled_subset(stand_in, labels_per_class=labels_per_class, fraction=fraction, seed=seed).images


@torch.no_grad()
def evaluate(net, ds, dist, amp="none", batch_size=256):
    """Top-1 accuracy of a classifier on a data set, sharded over ranks."""
    net.eval()
    correct, total = torch.zeros((), device=dist.device), torch.zeros((), device=dist.device)
    for x, y, _ in data.iterate(ds, batch_size, dist.device, rank=dist.rank, world_size=dist.world_size):
        with autocast(amp, dist.device):
            logits = net(x)
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return (all_sum(correct, dist) / all_sum(total, dist).clamp(min=1)).item()


@torch.no_grad()
def student_features(student, ds, device, amp="none", batch_size=256):
    student.eval()
    feats = []
    for x, _, _ in data.iterate(ds, batch_size, device):
        with autocast(amp, device):
            feats.append(student.forward_features(x)[-1].float().mean(dim=(2, 3)))
    return torch.cat(feats)


def t_hist_summary(hist, t_max, rows=None, max_bins=20):
    """Coarsen a per-bin histogram to at most max_bins bins over [0, t_max): edges and fractions."""
    h = hist if rows is None else hist[rows]
    h = h.sum(0) if h.dim() == 2 else h
    n, D = len(h), min(len(h), max_bins)
    coarse = torch.zeros(D, dtype=torch.float64).index_add_(0, torch.arange(n) * D // n, h.double().cpu())
    frac = (coarse / coarse.sum().clamp(min=1)).tolist()
    edges = [round(j * t_max / D, 3) for j in range(D + 1)]
    return {"edges": edges, "fraction": [round(v, 4) for v in frac], "n": int(h.sum().item())}


# ----------------------------------------------------------------------------------------------
# Stages


def distill(args, teacher=None):
    """Train student + projector (+ policy + task head) against the frozen teacher's features at policy-chosen t."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    ds = data.load(args.data, "train", args.image_size)
    if teacher is None:
        teacher = load_teacher(args.teacher, args.teacher_layer, args.teacher_input, dist.device, args.vae_path, args.data,
                               args.image_size)
    teacher.check_images(ds.sample_shape, f"--image-size {args.image_size}", args.teacher)
    teacher.probe_shape(ds.sample_shape, dist.device)
    labeled = ds.labels is not None and len(ds.classes) > 0
    if args.t_policy == "rl" and not labeled:
        raise UserError(f"--t-policy rl: the reward is the task head's CE, which needs labels; --data {args.data} has none")
    t_max = args.t_max or teacher.T
    if not 0 < t_max <= teacher.T or not 0 < args.t_bins <= t_max:
        raise UserError(f"--t-max must lie in (0, {teacher.T}] and --t-bins in (0, t_max]; got {args.t_max}, {args.t_bins}")
    if args.t_policy == "fixed" and not 0 <= args.t < t_max:
        raise UserError(f"--t {args.t}: must lie in [0, {t_max - 1}]")
    if args.feat_loss == "at" and len(teacher.map_shape) != 3:
        raise UserError("--feat-loss at needs a spatial teacher map")
    # only the rl policy reads labels (its reward); fixed and random distillation is label-free
    _, ds_masked = label_budget(ds, args.labels_per_class, args.labeled_fraction, args.seed) if args.t_policy == "rl" else (ds, ds)
    student = build_student(args.student, args.width, ds.sample_shape[0], stem=args.stem)
    with torch.no_grad():  # pair the teacher map with the student stage of the closest resolution (ties: deeper)
        sizes = [m.shape[-1] for m in student.forward_features(torch.zeros(1, *ds.sample_shape))]
    at_stage = min(range(4), key=lambda i: (abs(math.log(sizes[i] / teacher.map_shape[-1])), -i))
    decay = args.entropy_decay_steps if args.entropy_decay_steps is not None else args.steps // 2
    hist_every = args.hist_every or max(1, math.ceil(args.steps / HIST_ROWS))
    cfg = dict(stage="repfusion-distill", student=args.student, width=args.width, stem=args.stem, sample_shape=list(ds.sample_shape),
               teacher=args.teacher, teacher_kind=teacher.kind, teacher_layer=teacher.layer, teacher_dim=teacher.dim,
               teacher_map_shape=list(teacher.map_shape), teacher_input=args.teacher_input, T=teacher.T,
               feat_loss=args.feat_loss, at_stage=at_stage, t_policy=args.t_policy, t_bins=args.t_bins, t_max=t_max,
               t=args.t, num_classes=len(ds.classes) if labeled else 0, head_hidden=args.head_hidden,
               head_layernorm=args.head_layernorm, policy_zero_init=args.policy_zero_init, baseline=args.baseline,
               entropy_decay_steps=decay, hist_every=hist_every, data=args.data, image_size=args.image_size,
               classes=ds.classes, args=vars(args))
    model = for_device(RepFusion(cfg), dist)
    if args.compile and hasattr(teacher, "compile"):
        teacher.compile()
    weight = args.feat_weight if args.feat_weight is not None else FEAT_WEIGHT[args.feat_loss]
    loader = data.Loader(ds_masked, args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)
    n_bins = args.t_bins
    window = torch.zeros(4, dtype=torch.float64, device=dist.device)  # feature loss, head CE, head correct, labeled

    def loss_fn(net, x, y, step):
        g, n = step_generator(args.seed, step, dist.device), x.shape[0]
        u_pick = draw_global(g, "rand", n, dist)  # the policy's categorical draw
        u_bin = draw_global(g, "rand", n, dist)  # where in its bin t falls
        eps = draw_global(g, "randn", n, dist, *teacher.noise_shape(x))
        t_bin, t = pick_timesteps(model.policy, x, args.t_policy, u_pick, u_bin, n_bins, t_max, args.t)  # (N,), (N,)
        f_t, m_t = teacher(x, t, eps)  # (N, D_T) pooled, (N, C_T, h, w) map
        out = net(x, y, f_t, m_t)
        # The rest is bookkeeping around the objective: the t histogram, and the global batch's labeled count and
        # reward sum, gathered with one collective a step, so N ranks weight samples exactly as one process would.
        if step % args.log_every == 0:  # the diagnostics cover the last log window
            window.zero_()
        window[0] += out["feat"].detach()
        counts = torch.zeros(n_bins, dtype=torch.float64, device=x.device)
        stats = [counts.index_add_(0, t_bin, torch.ones_like(counts[t_bin]))]  # bincount without a host sync
        if "head_ce" in out:  # the head (and the reward) see only the labeled samples of the budget
            lab = (y >= 0).float()
            reward = -out["head_ce"].detach()
            stats.append(torch.stack([(reward * lab).sum(), lab.sum()]).double())
        with torch.no_grad():
            s = all_sum(torch.cat(stats), dist)
            model.t_hist[min(step // hist_every, HIST_ROWS - 1)] += s[:n_bins]
        w = advantage = None
        if "head_ce" in out:
            r_sum, n_lab = s[n_bins].float(), s[n_bins + 1].float().clamp(min=1)
            w = lab * dist.world_size / n_lab  # after DDP's mean over ranks: the mean over the global labeled batch
            correct = ((out["head_pred"] == y) * lab).sum()
            window[1:] += torch.stack([(out["head_ce"].detach() * lab).sum(), correct, lab.sum()]).double()
            b, nb = model.baseline
            # official: the reward itself (no baseline); --baseline ema: minus a moving average (first step: the batch mean)
            advantage = reward - torch.where(nb > 0, b, r_sum / n_lab) if args.baseline == "ema" else reward
        loss = distill_objective(out, t_bin, w, advantage, weight, entropy_coef(step, args.entropy_coef, decay))
        if "head_ce" in out:
            with torch.no_grad():  # moving-average baseline, identical on every rank (DDP broadcasts buffers)
                b, nb, m = model.baseline[0], model.baseline[1], args.baseline_momentum
                new = torch.stack([torch.where(nb > 0, m * b + (1 - m) * r_sum / n_lab, r_sum / n_lab), nb + 1])
                model.baseline.copy_(torch.where(s[n_bins + 1] > 0, new, model.baseline))
        return loss

    t0 = time.time()
    model, ema = fit(model, loss_fn, loader, args, dist, args.out_dir, cfg)
    seconds = time.time() - t0
    w = all_sum(window, dist)
    w[0] /= dist.world_size * ((args.steps - 1) % args.log_every + 1)
    hist = model.t_hist.cpu()
    used = min(HIST_ROWS, math.ceil(args.steps / hist_every))
    t_mean = float((hist.sum(0) * ((torch.arange(n_bins) + 0.5) * t_max / n_bins)).sum() / hist.sum().clamp(min=1)) \
        if args.t_policy != "fixed" else float(args.t)
    metrics = {"t_policy": args.t_policy, "t_hist": t_hist_summary(hist, t_max),
               "t_hist_last": t_hist_summary(hist, t_max, rows=used - 1),
               "t_mean": t_mean, "feat_loss": args.feat_loss, "teacher_kind": teacher.kind, "teacher_layer": teacher.layer,
               "teacher_input": args.teacher_input, "teacher_dim": teacher.dim, "baseline": float(model.baseline[0]),
               "n_reward_labels": int((ds_masked.labels >= 0).sum()) if args.t_policy == "rl" else 0,
               "final_feat_loss": w[0].item(), "steps": args.steps, "seconds": seconds}
    if args.t_policy == "rl":  # the task head on the teacher feature at the chosen t (labeled samples, last log window)
        metrics.update(final_head_ce=(w[1] / w[3].clamp(min=1)).item(), final_head_acc=(w[2] / w[3].clamp(min=1)).item())
    log = [json.loads(line) for line in open(os.path.join(args.out_dir, "log.jsonl"))] if dist.is_main else []
    if log:
        metrics["loss"] = log[-1]["loss"]
        metrics["img_s"] = sum(r["img_s"] for r in log[1:]) / max(1, len(log) - 1) if len(log) > 1 else log[-1]["img_s"]
    if dist.is_main:
        RunLog(args.out_dir, dist).metrics(metrics)
        full = {"bin_edges": [b * t_max / n_bins for b in range(n_bins + 1)], "hist_every": hist_every,
                "counts_per_tenth": hist[:used].tolist(), "counts": hist.sum(0).tolist()}
        save_json(os.path.join(args.out_dir, "t_hist.json"), full)
        D = min(n_bins, 20)
        rows = [t_hist_summary(hist[r], t_max, max_bins=D)["fraction"] for r in range(used)]
        save_heatmap(rows, os.path.join(args.out_dir, "t_hist.png"),
                     [f"<={min(args.steps, (r + 1) * hist_every)}" for r in range(used)],
                     [f"{round(j * t_max / D)}" for j in range(D)], fmt="{:.2f}",
                     title=f"chosen t ({args.t_policy}) per tenth of training")
        print(f"distill done: t policy {args.t_policy}, mean t {t_mean:.1f}, last tenth "
              f"{metrics['t_hist_last']['fraction']} over bins from {metrics['t_hist_last']['edges'][:-1]}")
    return metrics


def distilled_student(ckpt):
    """A `distill` checkpoint -> (its config, the student's state dict without the `student.` prefix)."""
    d = find_checkpoint(ckpt)
    dcfg = load_json(os.path.join(d, "config.json"))
    if dcfg.get("stage") != "repfusion-distill":
        raise UserError(f"--ckpt {ckpt}: not a `repfusion.py distill` checkpoint (stage {dcfg.get('stage')!r})")
    sd = {k[len("student."):]: v for k, v in load_weights(d, RepFusion(dcfg)).state_dict().items() if k.startswith("student.")}
    return dcfg, sd


def train_classifier(args, init=None):
    """finetune (init = a distill checkpoint: the student's weights) or scratch (init None): CE on the labeled
    subset, then top-1 accuracy on the test split."""
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank (fit starts the per-rank streams)
    amp = resolve_amp(args.amp, dist.device)
    dcfg, sd = distilled_student(init) if init is not None else (None, None)
    spec = (args.data or dcfg["data"]) if dcfg else args.data
    image_size = dcfg.get("image_size") if dcfg else args.image_size
    ds = data.load(spec, "train", image_size)
    if ds.labels is None or not ds.classes:
        raise UserError(f"--data {spec}: fine-tuning needs a labeled data set")
    test = data.load(args.test_data or spec, "test", image_size)
    sub, _ = label_budget(ds, args.labels_per_class, args.labeled_fraction, args.seed)
    student_name, width = (dcfg["student"], dcfg["width"]) if dcfg else (args.student, args.width)
    if dcfg and list(ds.sample_shape) != list(dcfg["sample_shape"]):
        raise UserError(f"--data {spec}: samples are {tuple(ds.sample_shape)}, "
                        f"the student was distilled on {tuple(dcfg['sample_shape'])}")
    K = len(ds.classes)
    model = for_device(build_student(student_name, width, ds.sample_shape[0], num_classes=K), dist)
    probe_acc = None
    if sd is not None:
        own = model.state_dict()
        sd = dict(sd, **{k: own[k] for k in ("fc.weight", "fc.bias")})
        load_state_dict_strict(model, sd, init)
        model.to(dist.device)  # the frozen distilled student, before any label: a linear probe of its features
        probe_acc = linear_probe(student_features(model, sub, dist.device, amp), sub.labels.to(dist.device),
                                 student_features(model, test, dist.device, amp), test.labels.to(dist.device), K)
        model.train()
    stage = "repfusion-finetune" if init else "repfusion-scratch"
    cfg = dict(stage=stage, student=student_name, width=width, sample_shape=list(ds.sample_shape), num_classes=K,
               init_from=init, data=spec, image_size=image_size, classes=ds.classes, n_labeled=len(sub), args=vars(args))
    loader = data.Loader(sub, args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)

    def loss_fn(net, x, y, step):
        return F.cross_entropy(net(x).float(), y)
    t0 = time.time()
    model, ema = fit(model, loss_fn, loader, args, dist, args.out_dir, cfg)
    acc = evaluate(ema, test, dist, amp)
    metrics = {"accuracy": acc, "chance": 1.0 / K, "n_labeled": len(sub), "n_test": len(test), "init": init,
               "steps": args.steps, "seconds": time.time() - t0}
    if probe_acc is not None:
        metrics["probe_accuracy"] = probe_acc
    RunLog(args.out_dir, dist).metrics(metrics)
    if dist.is_main:
        print(f"{stage.split('-')[1]}: test accuracy {acc:.4f} (chance {1 / K:.4f}, {len(sub)} labels)"
              + (f"; linear probe on the distilled student {probe_acc:.4f}" if probe_acc is not None else ""))
    return metrics


# ----------------------------------------------------------------------------------------------
# Dense tasks (paper 002, Sec. 5.2-5.3): face parsing with BiSeNetV1 (mIoU) and landmarks with heatmaps (NME)


def heatmap_targets(kp, hw, stride, sigma=2.0):
    """mmpose's TopDownGenerateTarget (MSRA encoding): for each keypoint (x, y) in input pixels, a Gaussian of std sigma
    (heatmap pixels) centred on the integer mu = int(kp / stride + 0.5), cut to a (6 sigma + 1)^2 window; the weight is
    0 when the window misses the heatmap (or the keypoint is NaN). kp: (N, K, 2); hw: (H, W) of the heatmap.
    -> (targets (N, K, H, W) in [0, 1], weights (N, K))"""
    H, W = hw
    valid = kp.isfinite().all(-1)
    mu = torch.floor(torch.nan_to_num(kp) / stride + 0.5)  # (N, K, 2)
    r = 3 * sigma
    ax = lambda n, m: torch.arange(n, device=kp.device, dtype=kp.dtype) - m[..., None]  # (N, K, n) offsets from mu
    g = lambda d: torch.exp(-d ** 2 / (2 * sigma ** 2)) * (d.abs() <= r)
    target = g(ax(H, mu[..., 1]))[..., :, None] * g(ax(W, mu[..., 0]))[..., None, :]
    ul, br = torch.trunc(mu - r), torch.trunc(mu + r + 1)  # mmpose's int() of the window corners
    inside = (ul[..., 0] < W) & (ul[..., 1] < H) & (br[..., 0] >= 0) & (br[..., 1] >= 0) & valid
    return target * inside[..., None, None], inside.to(kp.dtype)


def heatmap_loss(pred, target, weight):
    """mmpose's JointsMSELoss(use_target_weight=True): mean over keypoints of MSE(pred * w, target * w)."""
    return ((pred.float() - target) * weight[..., None, None]).pow(2).mean()


def decode_heatmaps(hm):
    """mmpose's 'default' post-processing: the argmax of each heatmap, moved a quarter pixel towards the higher
    neighbour along x and along y (where the argmax is not on the border). hm: (N, K, H, W) -> (N, K, 2) (x, y) in
    heatmap pixels (0 where the maximum is not positive, as mmpose)."""
    N, K, H, W = hm.shape
    flat = hm.float().flatten(2)
    maxval, idx = flat.max(2)
    x, y = (idx % W).float(), (idx // W).float()
    at = lambda dy, dx: flat.gather(2, ((y.long() + dy).clamp(0, H - 1) * W + (x.long() + dx).clamp(0, W - 1))[..., None])[..., 0]
    inner = (x > 1) & (x < W - 1) & (y > 1) & (y < H - 1)
    dx, dy = torch.sign(at(0, 1) - at(0, -1)), torch.sign(at(1, 0) - at(-1, 0))  # both read at the argmax
    xy = torch.stack([x + torch.where(inner, 0.25 * dx, 0.0), y + torch.where(inner, 0.25 * dy, 0.0)], -1)
    return xy * (maxval > 0)[..., None]


@torch.no_grad()
def predict_keypoints(net, x, flip_pairs, flip_test=True):
    """Keypoints (N, K, 2) in input pixels from a TopDown model: decode_heatmaps scaled by the input/heatmap stride
    (mmpose's transform_preds on the crop). flip_test: the heatmaps of the flipped input are flipped back (width
    reversed, left/right pairs swapped), shifted one pixel right (shift_heatmap=True) and averaged in, as mmpose."""
    hm = net(x).float()
    if flip_test:
        hf = net(x.flip(3)).float().flip(3)
        perm = list(range(hm.shape[1]))
        for i, j in flip_pairs:
            perm[i], perm[j] = j, i
        hf = hf[:, perm]
        hf[..., 1:] = hf[..., :-1].clone()
        hm = (hm + hf) / 2
    return decode_heatmaps(hm) * (x.shape[-1] / hm.shape[-1])


def miou(confusion, ignore_empty=True):
    """Per-class IoU and their mean from a confusion matrix (rows: true class, columns: predicted), accumulated over the
    whole test set as mmseg's total areas: IoU_c = TP / (TP + FP + FN). A class that is absent from both truth and
    prediction has no IoU (NaN) and is left out of the mean (mmseg's nanmean). -> (mean, per-class list, pixel accuracy)"""
    c = confusion.double()
    tp, union = c.diag(), c.sum(0) + c.sum(1) - c.diag()
    iou = tp / union  # NaN where union == 0
    return float(iou.nanmean()), iou.tolist(), float(tp.sum() / c.sum().clamp(min=1))


def confusion_matrix(pred, target, num_classes, ignore_index=data.IGNORE_INDEX):
    """(num_classes, num_classes) int64 counts of (true, predicted) over the pixels whose truth is not ignore_index."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def nme_per_sample(pred, gt, norm_pair):
    """Per-sample NME: the mean over keypoints of ||pred - gt|| divided by the distance between the two ground-truth
    keypoints of norm_pair (WFLW: 60 and 72, the outer eye corners: the inter-ocular distance, as mmpose's
    FaceWFLWDataset). pred, gt: (N, K, 2) -> (N,)"""
    i, j = norm_pair
    norm = (gt[:, i] - gt[:, j]).norm(dim=-1)
    return (pred - gt).norm(dim=-1).mean(1) / norm


def landmark_metrics(nme, threshold=0.1):
    """WFLW's summary of per-sample NMEs: mean NME, failure rate (fraction of samples with NME > threshold) and the
    AUC of the cumulative error distribution on [0, threshold], normalised to 1. The CED is a step function, so its
    area is exact: AUC = mean_i max(0, threshold - nme_i) / threshold (the usual fine-grid sums approach it)."""
    nme = nme.double()
    return {"nme": float(nme.mean()), "fr_10": float((nme > threshold).double().mean()),
            "auc_10": float((threshold - nme).clamp(min=0).mean() / threshold)}


def palette(n):
    """n distinct colours (uint8 (n, 3)); class 0 (background) is drawn as the image itself."""
    h = torch.arange(n, dtype=torch.float64) * 0.618033988749895 % 1.0
    k = (torch.stack([h * 6, h * 6 + 4, h * 6 + 2], 1)) % 6  # HSV -> RGB at s = v = 1 ...
    rgb = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return (55 + 200 * rgb).round().to(torch.uint8)


def mask_overlay(images, masks, num_classes):
    """uint8 images (N, 3, H, W) and masks (N, H, W) -> uint8 (N, 3, H, W): each class but background in its colour at
    half opacity, IGNORE_INDEX pixels grey."""
    pal = torch.cat([palette(num_classes), torch.zeros(256 - num_classes, 3, dtype=torch.uint8)])
    pal[data.IGNORE_INDEX] = 128
    col = pal[masks.long().cpu()].permute(0, 3, 1, 2).float()
    paint = (masks.cpu() > 0)[:, None]
    return torch.where(paint, (images.cpu().float() + col) / 2, images.cpu().float()).round().to(torch.uint8)


def landmark_overlay(images, truth, pred, min_size=128):
    """uint8 images (N, 3, H, W) enlarged (nearest) to at least min_size, with the ground-truth keypoints (green) and
    the predictions (red) drawn as dots, joined by a line. -> uint8 (N, 3, H', W')"""
    from PIL import Image, ImageDraw
    n, _, h, w = images.shape
    f = max(1, min_size // max(h, w))
    out = []
    for k in range(n):
        img = Image.fromarray(images[k].permute(1, 2, 0).cpu().numpy()).resize((w * f, h * f), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        pos = lambda p: ((p[0] + 0.5) * f - 0.5, (p[1] + 0.5) * f - 0.5)  # pixel centres at integers, in both scales
        r = max(1.5, f * 0.6 if h * f <= 256 else 1.5)
        for t, q in zip(truth[k].tolist(), pred[k].tolist()):
            if all(math.isfinite(v) for v in t):
                draw.line([pos(t), pos(q)], fill=(255, 255, 0), width=1)
                draw.ellipse([pos(t)[0] - r, pos(t)[1] - r, pos(t)[0] + r, pos(t)[1] + r], fill=(0, 220, 0))
            draw.ellipse([pos(q)[0] - r, pos(q)[1] - r, pos(q)[0] + r, pos(q)[1] + r], fill=(230, 0, 0))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def build_dense(task, student, width, in_channels, stem, num_out, head_ch=256, deconvs=3):
    """The downstream model of a task around a fresh student ResNet: BiSeNetV1 (seg, num_out classes) or TopDown
    (landmarks, num_out keypoints)."""
    backbone = build_student(student, width, in_channels, stem=stem)
    return BiSeNetV1(backbone, num_out) if task == "seg" else TopDown(backbone, num_out, head_ch, deconvs)


@torch.no_grad()
def evaluate_dense(net, ds, dist, amp="none", batch_size=64, flip_test=True):
    """Test figures of a dense model on ds, sharded over ranks. seg: confusion matrix -> mIoU, per-class IoU, pixel
    accuracy (logits upsampled bilinearly to the mask size). landmarks: per-sample NME, FR@0.1, AUC@0.1 (+ per
    attribute subset if ds has attributes). Also returns (indices, predictions) of up to 8 samples for the pictures."""
    net.eval()
    dev = dist.device
    if ds.task == "seg":
        K = ds.num_classes
        conf = torch.zeros(K, K, dtype=torch.long, device=dev)
        first = None
        for x, y, idx in data.iterate(ds, batch_size, dev, rank=dist.rank, world_size=dist.world_size):
            with autocast(amp, dev):
                logits = net(x)[0]
            pred = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            conf += confusion_matrix(pred, y, K)
            first = (idx[:8].cpu(), pred[:8].cpu()) if first is None else first
        m, iou, acc = miou(all_sum(conf, dist))
        return {"miou": m, "iou": {c: (None if math.isnan(v) else v) for c, v in zip(ds.classes, iou)}, "pixel_acc": acc}, first
    n, first = len(ds), None
    out = torch.zeros(n, device=dev)
    for x, y, idx in data.iterate(ds, batch_size, dev, rank=dist.rank, world_size=dist.world_size):
        with autocast(amp, dev):
            pred = predict_keypoints(net, x, ds.flip_pairs, flip_test)
        out[idx] = nme_per_sample(pred, y.float(), ds.norm_pair)
        first = (idx[:8].cpu(), pred[:8].cpu()) if first is None else first
    nme = all_sum(out, dist).cpu()
    res = landmark_metrics(nme)
    if ds.attributes is not None:  # WFLW's subsets (tools/evaluate_wlfw.sh): the samples with each attribute flag set
        res["nme_subsets"] = {a: float(nme[ds.attributes[:, i].bool()].mean()) if ds.attributes[:, i].any() else None
                              for i, a in enumerate(ds.attribute_names)}
    return res, first


def trivial_baseline(train, test):
    """What a model that ignores the image scores: seg, the most frequent training class everywhere (mIoU); landmarks,
    the mean training keypoints for every test sample (NME)."""
    if test.task == "seg":  # pixel counts in chunks: CelebAMask-HQ's masks are 6 GB
        counts = lambda m: sum(torch.bincount(c.flatten().long(), minlength=256) for c in m.split(64))[:test.num_classes]
        c, n = int(counts(train.masks).argmax()), counts(test.masks).double()
        # predicting c everywhere: IoU_c = n_c / N, 0 for every other class in the truth, no IoU for absent ones
        present = (n > 0) | (torch.arange(len(n)) == c)
        return {"miou": float(n[c] / n.sum() / present.sum())}
    mean = train.keypoints.float().nanmean(0)
    return {"nme": float(nme_per_sample(mean.expand_as(test.keypoints), test.keypoints.float(), test.norm_pair).mean())}


DENSE_SHAPES_DATA = {"seg": "shapes-seg", "landmarks": "shapes-landmarks"}


def train_dense(args, init=None):
    """finetune --task seg|landmarks (init = a distill checkpoint: its student becomes the backbone) or scratch (init
    None: the same model from random initialisation, as the official baselines): train on the (labeled fraction of
    the) training split, then evaluate on the test split (mIoU, or NME / FR / AUC) and draw overlays."""
    if args.labels_per_class is not None:
        raise UserError(f"--labels-per-class {args.labels_per_class}: --task {args.task} has no classes per image; "
                        f"give the label budget as --labeled-fraction")
    dist = setup_distributed(args.device, args.amp)
    compile_default(args, dist)
    torch.manual_seed(args.seed)
    amp = resolve_amp(args.amp, dist.device)
    dcfg, sd = distilled_student(init) if init is not None else (None, None)
    spec = DENSE_SHAPES_DATA[args.task] if args.data == "shapes" else args.data  # shapes' dense variant, same images
    if spec is None:
        if dcfg is None or dcfg.get("data") != "shapes":
            raise UserError(f"--task {args.task}: give --data (a CelebAMask-HQ / WFLW folder, or {DENSE_SHAPES_DATA[args.task]})")
        spec = DENSE_SHAPES_DATA[args.task]
    ds = data.load(spec, "train", args.image_size)
    test = data.load(args.test_data or spec, "test", args.image_size)
    if ds.task != args.task or test.task != args.task:
        raise UserError(f"--data {spec}: a {ds.task} data set, but --task is {args.task} "
                        f"(seg: masks, e.g. shapes-seg or CelebAMask-HQ; landmarks: keypoints, e.g. shapes-landmarks or WFLW)")
    sub = data.image_subset(ds, args.labeled_fraction, args.seed) if args.labeled_fraction is not None else ds
    student, width, stem = (dcfg["student"], dcfg["width"], dcfg.get("stem", "cifar")) if dcfg else (args.student, args.width, args.stem)
    if dcfg and ds.sample_shape[0] != dcfg["sample_shape"][0]:
        raise UserError(f"--data {spec}: images have {ds.sample_shape[0]} channels, the student was distilled on {dcfg['sample_shape'][0]}")
    num_out = ds.num_classes if args.task == "seg" else ds.keypoints.shape[1]
    model = build_dense(args.task, student, width, ds.sample_shape[0], stem, num_out, args.head_ch, args.deconvs)
    if sd is not None:
        load_state_dict_strict(model.backbone, sd, init)
    model = for_device(model, dist)
    stage = "repfusion-finetune" if init else "repfusion-scratch"
    cfg = dict(stage=stage, task=args.task, student=student, width=width, stem=stem, sample_shape=list(ds.sample_shape),
               num_out=num_out, head_ch=args.head_ch, deconvs=args.deconvs, init_from=init, data=spec,
               image_size=args.image_size, classes=ds.classes, n_labeled=len(sub), args=vars(args))
    loader = data.Loader(sub, args.batch_size, dist.device, seed=args.seed, augment=not args.no_augment,
                         rank=dist.rank, world_size=dist.world_size)
    sigma = args.sigma

    def loss_fn(net, x, y, step):
        out = net(x)
        if args.task == "seg":  # CE on the main and both auxiliary heads (weight 1 each), logits upsampled to the mask
            up = lambda o: F.interpolate(o.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            return sum(F.cross_entropy(up(o), y.long(), ignore_index=data.IGNORE_INDEX) for o in out)
        target, weight = heatmap_targets(y.float(), out.shape[-2:], x.shape[-1] / out.shape[-1], sigma)
        return heatmap_loss(out, target, weight)
    t0 = time.time()
    model, ema = fit(model, loss_fn, loader, args, dist, args.out_dir, cfg)
    res, first = evaluate_dense(ema, test, dist, amp, flip_test=not args.no_flip_test)
    metrics = dict(res, task=args.task, trivial=trivial_baseline(sub, test), n_labeled=len(sub), n_test=len(test),
                   init=init, steps=args.steps, seconds=time.time() - t0)
    RunLog(args.out_dir, dist).metrics(metrics)
    if dist.is_main:
        idx, pred = first
        k, images = len(idx), test.images[idx]
        if args.task == "seg":
            pics = torch.cat([images, mask_overlay(images, test.masks[idx], test.num_classes),
                              mask_overlay(images, pred.to(torch.uint8), test.num_classes)])
            save_image_grid(pics, os.path.join(args.out_dir, "masks.png"), nrow=k,
                            captions=["image"] * k + ["truth"] * k + ["prediction"] * k)
            print(f"{stage.split('-')[1]} (seg): test mIoU {res['miou']:.4f} (the most frequent class everywhere: "
                  f"{metrics['trivial']['miou']:.4f}), pixel accuracy {res['pixel_acc']:.4f}, {len(sub)} labeled images")
        else:
            pics = landmark_overlay(images, test.keypoints[idx], pred)
            save_image_grid(pics, os.path.join(args.out_dir, "landmarks.png"), nrow=min(k, 4))
            print(f"{stage.split('-')[1]} (landmarks): test NME {res['nme']:.4f} (the mean shape: {metrics['trivial']['nme']:.4f}), "
                  f"FR@0.1 {res['fr_10']:.4f}, AUC@0.1 {res['auc_10']:.4f}, {len(sub)} labeled images")
    return metrics


def finetune(args):
    return train_classifier(args, init=args.ckpt) if args.task == "classification" else train_dense(args, init=args.ckpt)


def scratch(args):
    return train_classifier(args, init=None) if args.task == "classification" else train_dense(args, init=None)


# ----------------------------------------------------------------------------------------------
# The bare run: teacher -> distill -> finetune, and the scratch baseline, on `shapes` on the CPU


def train_teacher(args, out):
    """A small teacher for the bare run: the tiny DDPM UNet (base width --teacher-ch) trained with the DDPM eps
    objective on the same data, as `ddae_probe.py pretrain --model tiny` would; its checkpoint is that format."""
    dist = setup_distributed(args.device, args.amp)
    torch.manual_seed(args.seed)  # initial weights: the same on every rank
    ds = data.load(args.data, "train", args.image_size)
    space = Space(ds, None, dist.device)
    C, H, W = space.sample_shape
    model = UNet(**dict(UNet_models["tiny"], in_channels=C, image_size=H, ch=args.teacher_ch))
    cfg = dict(stage="pretrain", arch="unet", model="tiny", unet=model.config, objective="ddpm", T=1000, beta_range=[1e-4, 0.02],
               sample_shape=[C, H, W], num_classes=0, data=args.data, image_size=args.image_size, vae_path=None,
               scaling_factor=space.scaling_factor, classes=ds.classes, amp="auto")
    if dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    obj = make_objective(cfg, dist.device)
    loader = data.Loader(ds, 32, dist.device, seed=args.seed, augment=True, crop_padding=0, flip=True,  # flip only, as DDPM
                         rank=dist.rank, world_size=dist.world_size)
    p = argparse.ArgumentParser()  # the shared training flags and their defaults, as every training stage has them
    add_common_args(p, out)
    add_train_args(p, steps=args.teacher_steps, batch_size=32, lr=2e-3)
    run = p.parse_args(["--seed", str(args.seed), "--warmup", "50", "--ema-decay", "0.999", "--log-every", "100",
                        "--ckpt-every", str(args.teacher_steps), *(["--overwrite"] if args.overwrite else [])])
    compile_default(run, dist)
    fit(model, lambda net, x, y, step: obj.loss(net, x, step, args.seed, dist), loader, run, dist, out, cfg)
    return out


def pipeline(args):
    """python repfusion.py --out-dir D: teacher (or --teacher), distill, finetune, and the scratch baseline."""
    t0 = time.time()
    out = args.out_dir
    teacher = args.teacher or train_teacher(args, os.path.join(out, "teacher"))
    t_teacher = time.time() - t0
    common = ["--data", args.data, "--device", args.device, "--seed", str(args.seed), "--amp", args.amp]
    size = ["--image-size", str(args.image_size)] if args.image_size else []  # finetune reads it from the distill run
    if args.compile is not None:
        common.append("--compile" if args.compile else "--no-compile")
    lab = ["--labels-per-class", str(args.labels_per_class)]
    # the bare run's CPU recipe, passed explicitly (the stages default to the official one): clipping at 1
    train = ["--batch-size", str(args.batch_size), "--lr", str(args.lr), "--log-every", "50", "--ema-decay", str(args.ema_decay),
             "--grad-clip", "1.0", "--optimizer", "adamw", "--weight-decay", "0", "--no-nesterov", "--lr-steps",
             *(["--overwrite"] if args.overwrite else [])]
    # ... and, for the policy on 400 steps, a moving-average baseline, a uniform start and a LayerNormed 256-wide head
    policy = ["--baseline", "ema", "--policy-zero-init", "--head-layernorm", "--head-hidden", "256"]
    p = build_parser()
    r_d = distill(p.parse_args(["distill", "--teacher", teacher, "--out-dir", f"{out}/distill", *common, *size, *train,
                                "--steps", str(args.steps), "--student", args.student, "--width", str(args.width),
                                "--t-policy", args.t_policy, "--t-bins", str(args.t_bins), "--teacher-input", args.teacher_input,
                                "--feat-loss", args.feat_loss or ("at" if args.task == "classification" else "mse"), *policy,
                                *(lab if args.reward_labels == "budget" else [])]))
    if args.task != "classification":
        return dense_pipeline(args, p, r_d, teacher, [*common, *size], train, t0, t_teacher)
    if args.finetune_lr is not None:
        train = [*train, "--lr", str(args.finetune_lr)]
    n_labeled = args.labels_per_class * len(load_json(f"{out}/distill/ckpt/config.json")["classes"])  # no second data load
    if n_labeled < args.batch_size:  # a batch cannot be larger than the labeled set: fine-tune on all of it each step
        train = [*train, "--batch-size", str(n_labeled)]
        print(f"[pipeline] finetune and scratch: batch {n_labeled}, the whole label budget (--batch-size {args.batch_size} "
              f"is larger)")
    r_f = finetune(p.parse_args(["finetune", "--ckpt", f"{out}/distill/ckpt", "--out-dir", f"{out}/finetune", *common, *lab, *train,
                                 "--steps", str(args.finetune_steps)]))
    r_s = scratch(p.parse_args(["scratch", "--out-dir", f"{out}/scratch", *common, *size, *lab, *train, "--steps", str(args.finetune_steps),
                                "--student", args.student, "--width", str(args.width)]))
    metrics = {"student_acc": r_f["accuracy"], "scratch_acc": r_s["accuracy"], "chance": r_f["chance"],
               "student_probe_acc": r_f.get("probe_accuracy"), "t_policy": r_d["t_policy"], "t_hist": r_d["t_hist"],
               "t_hist_last": r_d["t_hist_last"], "t_mean": r_d["t_mean"], "n_labeled": r_f["n_labeled"], "n_test": r_f["n_test"],
               "n_reward_labels": r_d["n_reward_labels"],
               "teacher": teacher, "teacher_layer": r_d["teacher_layer"], "teacher_input": r_d["teacher_input"],
               "student": args.student, "width": args.width,
               "seconds": {"teacher": t_teacher, "distill": r_d["seconds"], "finetune": r_f["seconds"], "scratch": r_s["seconds"],
                           "total": time.time() - t0}}
    if int(os.environ.get("RANK", 0)) != 0:
        return metrics
    save_json(os.path.join(out, "metrics.json"), metrics)
    print(f"\nstudent (distilled + fine-tuned) {metrics['student_acc']:.3f} | scratch {metrics['scratch_acc']:.3f} | "
          f"chance {metrics['chance']:.3f} | linear probe on the distilled student {metrics['student_probe_acc']:.3f} | "
          f"{metrics['n_labeled']} labels | mean t {metrics['t_mean']:.0f} | {metrics['seconds']['total']:.0f} s")
    return metrics


def dense_pipeline(args, p, r_d, teacher, common, train, t0, t_teacher):
    """The bare run's dense tail: finetune --task seg|landmarks from the distilled student and scratch, same budget and
    seed, on the dense variant of the distillation data (shapes -> shapes-seg / shapes-landmarks)."""
    out, task = args.out_dir, args.task
    if args.data != "shapes":
        raise UserError(f"--task {task}: the bare run's dense data is the dense variant of shapes; run finetune/scratch "
                        f"--task {task} --data ... for other data")
    common = [*common[2:], "--data", DENSE_SHAPES_DATA[task]]
    lr = args.finetune_lr if args.finetune_lr is not None else 1e-2
    train = [*train, "--lr", str(lr)]  # (the later --lr wins over the distillation's)
    dense = ["--task", task, "--labeled-fraction", str(args.labeled_fraction), "--head-ch", str(args.head_ch),
             "--steps", str(args.finetune_steps)]
    r_f = finetune(p.parse_args(["finetune", "--ckpt", f"{out}/distill/ckpt", "--out-dir", f"{out}/finetune", *common, *train, *dense]))
    r_s = scratch(p.parse_args(["scratch", "--out-dir", f"{out}/scratch", *common, *train, *dense,
                                "--student", args.student, "--width", str(args.width)]))
    key = "miou" if task == "seg" else "nme"
    metrics = {f"student_{key}": r_f[key], f"scratch_{key}": r_s[key], f"trivial_{key}": r_f["trivial"][key], "task": task,
               "n_labeled": r_f["n_labeled"], "n_test": r_f["n_test"], "t_policy": r_d["t_policy"], "t_mean": r_d["t_mean"],
               "teacher": teacher, "teacher_layer": r_d["teacher_layer"], "student": args.student, "width": args.width,
               "head_ch": args.head_ch if task == "landmarks" else None,
               "seconds": {"teacher": t_teacher, "distill": r_d["seconds"], "finetune": r_f["seconds"], "scratch": r_s["seconds"],
                           "total": time.time() - t0}}
    if task == "landmarks":
        metrics.update({f"{who}_{k}": r[k] for who, r in (("student", r_f), ("scratch", r_s)) for k in ("fr_10", "auc_10")})
    else:
        metrics.update(student_iou=r_f["iou"], scratch_iou=r_s["iou"])
    if int(os.environ.get("RANK", 0)) != 0:
        return metrics
    save_json(os.path.join(out, "metrics.json"), metrics)
    better = "higher" if task == "seg" else "lower"
    print(f"\n{task}: student (distilled + fine-tuned) {key} {metrics[f'student_{key}']:.4f} | scratch {metrics[f'scratch_{key}']:.4f} "
          f"| trivial {metrics[f'trivial_{key}']:.4f} ({better} is better) | {metrics['n_labeled']} labeled images | "
          f"{metrics['seconds']['total']:.0f} s")
    return metrics


def main(args):
    stages = {"distill": distill, "finetune": finetune, "scratch": scratch, None: pipeline}
    if args.cmd is not None:
        check_out_dir(args)
    try:
        return stages[args.cmd](args)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run(main, build_parser())
