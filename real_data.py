"""
The four bare recipes on a real data set, one command: each method file's pipeline runs as a user would run it
(`python SCRIPT.py --data D --out-dir OUT/SCRIPT/seedS`, a process of its own), then one table puts each headline
beside its baseline, says whether it shows the paper's direction, and gives the wall time, the date and the device
(OUT/real_data.json and OUT/real_data.md).

    python real_data.py                               # the bare runs on `digits` (about 10 minutes on 2 CPU cores)
    python real_data.py --budget gpu                  # the longer recipes below, for one GPU
    python real_data.py --data /data/cifar10 --only ddae_probe repfusion --seeds 0 1 2
    python real_data.py --only diffusion_classifier --flags diffusion_classifier "--steps 8000"

The paper's direction, per file (README, "On real images"):
  ddae_probe             the best layer x t probe on the diffusion features above a linear probe on raw pixels
  diffusion_classifier   the adaptive (auto) schedule within one point of the exhaustive one at <= 1/4 of its passes
  repfusion              the distilled student above the same student trained from scratch (same labels)
  repcond_dit            Diffusion Classifier Zero at least as accurate as a linear probe on r (same labels)
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from cli import HelpFormatter, UserError, run

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("ddae_probe", "diffusion_classifier", "repfusion", "repcond_dit")
# --budget gpu: longer runs of the same recipes, sized from the CPU budget curves in the README (where the effect grows
# with steps) to take a few minutes each on one GPU; --budget cpu adds nothing (the bare runs)
BUDGETS = {
    "cpu": {s: [] for s in SCRIPTS},
    "gpu": {"ddae_probe": ["--steps", "12800"],
            "diffusion_classifier": ["--steps", "32000", "--n-samples", "64", "--n-test", "1000"],
            "repfusion": ["--teacher-steps", "4800", "--steps", "3200", "--finetune-steps", "800", "--labels-per-class", "7"],
            "repcond_dit": ["--steps", "4800", "--tune-steps", "24000", "--n-noise", "8"]},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--data", default="digits", help="any --data the method files read (a built-in name, a folder, a file)")
    p.add_argument("--out-dir", default="runs/real_data")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS), help="cpu: the bare runs; gpu: " + "; ".join(
        f"{s} {' '.join(f)}" for s, f in BUDGETS["gpu"].items()))
    p.add_argument("--only", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="run these method files only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (passed to every file)")
    p.add_argument("--flags", nargs=2, action="append", default=[], metavar=("SCRIPT", "FLAGS"),
                   help="more flags for one file's command line, quoted (repeatable; after the budget's, so they win)")
    p.add_argument("--overwrite", action="store_true", help="passed to every file: replace the runs OUT_DIR holds")
    return p


def headline(script, m):
    """A pipeline's metrics.json -> (headline text, baseline text, the paper's direction shown: bool)."""
    if script == "ddae_probe":
        return (f"best probe {m['probe_best_acc']:.3f} ({m['probe_best_layer']}, t = {m['probe_best_t']})",
                f"raw pixels {m['raw_pixel_acc']:.3f}", m["probe_best_acc"] > m["raw_pixel_acc"])
    if script == "diffusion_classifier":
        return (f"auto {m['accuracy']:.3f} at {m['nfe_per_image']:.1f} passes ({100 * m['nfe_fraction']:.0f}%)",
                f"exhaustive {m['accuracy_full']:.3f} at {m['nfe_full']:.0f}",
                m["accuracy"] >= m["accuracy_full"] - 0.01 and m["nfe_fraction"] <= 0.25)
    if script == "repfusion":
        return (f"student {m['student_acc']:.3f} ({m['n_labeled']} labels)", f"scratch {m['scratch_acc']:.3f}",
                m["student_acc"] > m["scratch_acc"])
    if script == "repcond_dit":
        return (f"DC0 {m['accuracy']:.3f} (t = {m['best_t']})", f"probe on r {m['probe_accuracy']:.3f}",
                m["accuracy"] >= m["probe_accuracy"])
    raise ValueError(script)


def device_name(device):
    """The device the runs used, in words (imports torch only here, so that --help stays instant)."""
    import torch
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(args):
    extra = {}
    for script, flags in args.flags:
        if script not in SCRIPTS:
            raise UserError(f"--flags {script}: not one of {', '.join(SCRIPTS)}")
        extra.setdefault(script, []).extend(shlex.split(flags))
    os.makedirs(args.out_dir, exist_ok=True)
    rows, started = [], time.strftime("%Y-%m-%d")
    for script in args.only:
        for seed in args.seeds:
            out = os.path.join(args.out_dir, script, f"seed{seed}")
            cmd = [sys.executable, os.path.join(HERE, f"{script}.py"), "--data", args.data, "--out-dir", out, "--seed", str(seed),
                   "--device", args.device, *BUDGETS[args.budget][script], *extra.get(script, []),
                   *(["--overwrite"] if args.overwrite else [])]
            print(f"[real_data] {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
            t0 = time.time()
            with open(os.path.join(args.out_dir, f"{script}_seed{seed}.log"), "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            seconds = time.time() - t0
            if rc != 0:  # one failed file does not stop the others; its row says where to look
                rows.append(dict(script=script, seed=seed, error=f"exit {rc}: see {log.name}", seconds=seconds))
                print(f"[real_data] {script} seed {seed} failed (exit {rc}): see {log.name}", flush=True)
                continue
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            head, base, shown = headline(script, metrics)
            rows.append(dict(script=script, seed=seed, headline=head, baseline=base, direction=shown, seconds=seconds,
                             command=" ".join(shlex.quote(c) for c in [f"{script}.py", *cmd[2:]]), metrics=metrics))
            print(f"[real_data] {script} seed {seed}: {head} | {base} | direction {'yes' if shown else 'no'} | {seconds:.0f} s", flush=True)
    device = device_name(args.device)
    table = [f"`--data {args.data}`, `--budget {args.budget}`, {started}, {device}", "",
             "| script | seed | headline | baseline | the paper's direction? | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['script']} | {r['seed']} | {r['error']} | | | {r['seconds']:.0f} s |")
        else:
            table.append(f"| {r['script']} | {r['seed']} | {r['headline']} | {r['baseline']} | {'yes' if r['direction'] else 'no'} | "
                         f"{r['seconds']:.0f} s |")
    with open(os.path.join(args.out_dir, "real_data.json"), "w") as f:
        json.dump(dict(data=args.data, budget=args.budget, date=started, device=device, rows=rows), f, indent=1)
    with open(os.path.join(args.out_dir, "real_data.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    return rows


if __name__ == "__main__":
    run(main, build_parser())
