"""
The command line every script shares, and the names it offers: the common and training flags (one name per concept
in all four scripts), the model presets, `run` (one error line, flags before the subcommand handed to it).

Standard library only: each script builds its parser and answers --help (answer_early) before it imports torch,
which alone takes about 2 s. models.py builds the presets listed here; training.py and data.py re-export what
they always offered (UserError, run, parse_args, add_common_args, add_train_args).
"""
import argparse
import math
import os
import sys


class UserError(Exception):
    """Something the user got wrong (path, file, flag); the message is one line naming it."""


# ----------------------------------------------------------------------------------------------
# Model presets (the names --model / --encoder offer; models.build_model and models.UNet build them)


# presets: (depth, hidden, heads); DiT-XS and ViT-XS are this project's CPU sizes for demos and tests
_DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4)}


DiT_models = {f"DiT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for s, (d, h, n) in _DIT_SIZES.items() for p in (2, 4, 8)}


_VIT_SIZES = {"B": (12, 768, 12), "S": (12, 384, 6), "XS": (4, 128, 4)}


ViT_models = {f"ViT-{s}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for s, (d, h, n) in _VIT_SIZES.items() for p in (2, 4, 8)}


# presets; `tiny` is this project's CPU size (tests, the bare run)
UNet_models = {
    "ddpm": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1),  # 35.7M at 32x32
    "ddpmpp": dict(ch=128, ch_mult=(2, 2, 2), num_res_blocks=4, attn_res=(16,), dropout=0.13,
                   resblock_updown=True, skip_scale=math.sqrt(0.5), up_attn_last_only=True),  # EDM's CIFAR-10 DDPM++, 55.7M
    "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,), dropout=0.0),  # 0.28M at 32x32
}


# The official DiT training recipe (DiT's train.py): no gradient clipping, EMA 0.9999 updated from step 0 without a
# warm-up; the defaults of every DiT-training stage here (`add_train_args(..., **DIT_RECIPE)`). Short CPU runs pass
# --ema-warmup --grad-clip 1 (an EMA of decay 0.9999 after a few hundred steps is still the initial weights).
DIT_RECIPE = dict(grad_clip=0.0, ema_warmup=False)


INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript Inception (the one StyleGAN2-ADA and EDM use)


# ----------------------------------------------------------------------------------------------
# Flags and parsing


def add_train_args(p, steps, batch_size, lr, grad_clip=1.0, ema_warmup=True, optimizer="adamw", weight_decay=0.0,
                   nesterov=False, lr_steps=()):
    """The training flags every script shares (same names everywhere), with this stage's defaults."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size, help="global batch, across ranks")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--optimizer", default=optimizer, choices=["adamw", "sgd"], help="adamw: betas (0.9, 0.999); sgd: --momentum")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd's momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=nesterov, help="sgd: Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    p.add_argument("--lr-steps", type=int, nargs="*", default=list(lr_steps),
                   help="multiply the lr by 0.1 at each of these steps (a step schedule; give it again when you change --steps)")
    p.add_argument("--grad-clip", type=float, default=grad_clip, help="max global gradient norm (0: no clipping)")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=ema_warmup,
                   help="EMA decay min(--ema-decay, (1 + step) / (10 + step)): it follows the model closely early on")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval: at the first log step at or past each multiple")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT_DIR/ckpt (the flags that shape the run must match)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 peak for MFU (H100 SXM dense: 989)")


def add_common_args(p, out_dir, data=True, test=True):
    """The flags every stage shares. out_dir: this script's and stage's own default folder (a stage never writes
    into another's). data=False for stages that read their data from a checkpoint (they get --data as an override);
    test=False for stages that never read a test split (no --test-data)."""
    if data:
        p.add_argument("--data", default="shapes", help="shapes | digits | cifar10 | cifar100 | tinyimagenet | a folder | a latents .safetensors")
        p.add_argument("--image-size", type=int, default=None, help="resize (ADM center crop) to this many pixels")
        p.add_argument("--vae-path", default=None, help="SD VAE file: encode images to latents on the fly (else pixel space)")
    else:
        p.add_argument("--data", default=None, help="the data to use instead of the checkpoint's (the same sample shape)")
        p.add_argument("--vae-path", default=None, help="the SD VAE to use instead of the checkpoint's")
    if test:
        p.add_argument("--test-data", default=None, help="the test split's file when the data is one split's (a latents file)")
    p.add_argument("--out-dir", default=out_dir)
    p.add_argument("--overwrite", action="store_true", help="replace what OUT_DIR holds (without it, a folder holding a run is refused)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every default, also of flags without a help text."""
    def add_argument(self, action):
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
        super().add_argument(action)


def parse_args(parser, argv=None):
    """parser.parse_args, except that a flag given BEFORE the subcommand is handed to the subcommand: plain argparse
    lets the subcommand's own default silently replace it (`x.py --steps 3 pretrain` ran 400,000 steps). A flag the
    subcommand does not take is then refused by argparse, naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    i = 0
    while sub is not None and i < len(argv):
        tok = argv[i]
        if tok in sub.choices:
            if i > 0:
                argv = [tok, *argv[:i], *argv[i + 1:]]
            break
        action = parser._option_string_actions.get(tok.split("=", 1)[0]) if tok.startswith("-") else None
        i += 1
        if action is not None and "=" not in tok:  # skip the flag's values
            if action.nargs in ("+", "*"):
                while i < len(argv) and not argv[i].startswith("-") and argv[i] not in sub.choices:
                    i += 1
            elif action.nargs is None or action.nargs == "?":
                i += 1
            elif isinstance(action.nargs, int):
                i += action.nargs
    return parser.parse_args(argv)


def _one_line_errors(parser):
    """argparse's own errors (a missing or unknown flag) as one line and exit status 1, like every other user error."""
    def error(message):
        raise UserError(f"{message} (see {parser.prog} --help)")
    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)


def run(main, parser, argv=None):
    """A script's entry point: parse (parse_args), run main(args), and turn a UserError into one `error: ...` line and
    exit status 1, printed by rank 0 only (under torchrun every rank stops; one line says why)."""
    _one_line_errors(parser)
    try:
        main(parse_args(parser, argv))
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def answer_early(parser, argv=None):
    """Parse the command line before a script's heavy imports: --help, and a line argparse refuses, are answered at
    once (one `error: ...` line, exit status 1). The script parses it again in `run`, after its imports."""
    run(lambda args: None, parser, argv)
