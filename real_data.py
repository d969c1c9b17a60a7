"""
The four bare recipes on a real data set, one command: each method file's bare run is started as a user starts it
(`python SCRIPT.py --data D --out-dir OUT/SCRIPT/seedS --seed S`, a process of its own, with the budget's and your
flags), then one table puts each headline beside its baseline, says whether it shows the paper's direction, and gives
the wall time, the date and the machine (OUT/real_data.json, with these settings, and OUT/real_data.md). The table is
rewritten after every run; a finished run is reused when the same command is asked for again (--overwrite reruns it).

    python real_data.py                               # the bare runs on `digits` (about 10 minutes on 2 CPU cores)
    python real_data.py --budget gpu --device cuda    # larger budgets for one GPU (not yet measured)
    python real_data.py --data /data/cifar10 --only ddae_probe repfusion --seeds 0 1 2
    python real_data.py --only diffusion_classifier --flags "diffusion_classifier=--steps 8000 --no-augment"

The paper's direction, per file (the README's "On real images" tables):
  ddae_probe             the best layer x t probe on the diffusion features above a linear probe on raw pixels
  diffusion_classifier   the adaptive (auto) schedule within one point of the exhaustive one at <= 1/4 of its passes
  repfusion              the distilled student above the same student trained from scratch (same labels)
  repcond_dit            Diffusion Classifier Zero at least as accurate as a linear probe on r (same labels)
With several seeds a script also gets a mean row: the direction on the means, and in how many seeds it holds.
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
OWN = ("--data", "--out-dir", "--seed", "--device", "--overwrite")  # set by this script, so refused inside --flags
# --budget gpu: not yet run on a GPU; each is the bare recipe with the knob that moved it on the CPU scaled up (README,
# "Where the effect appears at another budget"): ddae 1600 -> 6400 steps took digits from 0.820 to 0.901; the ELBO
# classifier's exhaustive accuracy went 0.400 / 0.513 / 0.800 at 2000 / 8000 / 32000 steps, its auto schedule within
# one point at 31% of the passes at 32000 (33 min on 2 CPU cores); DC0 grows with tuning (8 draws: 0.406 -> 0.772 at
# 3000 -> 48000 steps, probe 0.876) and noise draws (2 -> 16: 0.358 -> 0.544); repfusion's stages run longer
BUDGETS = {
    "cpu": {s: [] for s in SCRIPTS},
    "gpu": {"ddae_probe": ["--steps", "12800"],
            "diffusion_classifier": ["--steps", "32000", "--n-samples", "64", "--n-test", "1000"],
            "repfusion": ["--teacher-steps", "4800", "--steps", "3200", "--finetune-steps", "800"],
            "repcond_dit": ["--steps", "4800", "--tune-steps", "96000", "--n-noise", "16"]},
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--data", default="digits", help="any --data the method files read (a built-in name, a folder, a file)")
    p.add_argument("--out-dir", default="runs/real_data", help="OUT: each run in OUT/SCRIPT/seedS, its log in OUT/SCRIPT_seedS.log")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS), help="cpu: the bare runs as they are; gpu: " + "; ".join(
        f"{s} {' '.join(f)}" for s, f in BUDGETS["gpu"].items()))
    p.add_argument("--only", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="run these method files only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of each file per seed")
    p.add_argument("--device", default=None, help="passed to every file (default: each file's own: auto, cpu for diffusion_classifier)")
    p.add_argument("--flags", action="append", default=[], metavar="SCRIPT=FLAGS",
                   help='more flags for one file, e.g. "diffusion_classifier=--steps 8000 --no-augment" (repeatable; after the '
                        f"budget's, so they win; not {', '.join(OWN)}, which this script sets)")
    p.add_argument("--overwrite", action="store_true", help="rerun finished runs (passed to every file: replace what its OUT_DIR holds)")
    return p


def scores(script, m):
    """A bare run's metrics.json -> (headline, baseline, higher is better) as numbers."""
    keys = {"ddae_probe": ("probe_best_acc", "raw_pixel_acc"), "diffusion_classifier": ("accuracy", "accuracy_full"),
            "repcond_dit": ("accuracy", "probe_accuracy")}.get(script)
    if script == "repfusion":  # classification, or the dense tail's mIoU / NME (--task seg|landmarks)
        key = next((k for k in ("acc", "miou", "nme") if f"student_{k}" in m), "acc")
        keys = (f"student_{key}", f"scratch_{key}")
        return m[keys[0]], m[keys[1]], key != "nme"
    return m[keys[0]], m[keys[1]], True


def shows(script, value, base, higher, nfe_fractions):
    """The paper's direction (the module docstring's list) for a headline and its baseline (or their means)."""
    if script == "diffusion_classifier":
        return value >= base - 0.01 and max(nfe_fractions) <= 0.25
    return value > base if higher else value < base


def headline(script, m):
    """A bare run's metrics.json -> (headline text, baseline text, the paper's direction shown: bool)."""
    value, base, higher = scores(script, m)
    shown = shows(script, value, base, higher, [m.get("nfe_fraction", 0)])
    if script == "ddae_probe":
        return f"best probe {value:.3f} ({m['probe_best_layer']}, t = {m['probe_best_t']})", f"raw pixels {base:.3f}", shown
    if script == "diffusion_classifier":
        return (f"auto {value:.3f} at {m['nfe_per_image']:.1f} passes ({100 * m['nfe_fraction']:.0f}%)",
                f"exhaustive {base:.3f} at {m['nfe_full']:.0f}", shown)
    if script == "repfusion":
        what = next((name for k, name in (("miou", " mIoU"), ("nme", " NME")) if f"student_{k}" in m), "")
        return f"student{what} {value:.3f} ({m['n_labeled']} labels)", f"scratch{what} {base:.3f}", shown
    return f"DC0 {value:.3f} (t = {m['best_t']})", f"probe on r {base:.3f}", shown


def machine(device):
    """The machine in words: the CPU, and the GPU when the runs could use one (torch imported here only, so that --help
    answers at once)."""
    import torch
    cpu = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else None
    return f"{gpu}, {cpu}" if gpu else cpu


def table(args, rows, date, where):
    lines = [f"`--data {args.data}`, `--budget {args.budget}`, {date}, {where}", "",
             "| script | seed | headline | baseline | the paper's direction? | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['script']} | {r['seed']} | {r['error']} | | | {r['seconds']:.0f} s |")
        else:
            shown = ("yes" if r["direction"] else "no") + (f" ({r['note']})" if r.get("note") else "")
            lines.append(f"| {r['script']} | {r['seed']} | {r['headline']} | {r['baseline']} | {shown} | {r['seconds']:.0f} s |")
    return lines


def mean_row(script, done):
    """Over the seeds of one script: the means of headline and baseline, the direction on them and per seed."""
    vals = [scores(script, r["metrics"]) for r in done]
    v, b = (sum(x[i] for x in vals) / len(vals) for i in (0, 1))
    on_mean = shows(script, v, b, vals[0][2], [r["metrics"].get("nfe_fraction", 0) for r in done])
    k = sum(r["direction"] for r in done)
    return dict(script=script, seed="mean", headline=f"{v:.3f}", baseline=f"{b:.3f}", direction=on_mean,
                seconds=sum(r["seconds"] for r in done), note=f"{k} of {len(done)} seeds")


def one_run(args, script, seed, extra):
    """Run (or reuse) one bare run -> its row."""
    out = os.path.join(args.out_dir, script, f"seed{seed}")
    cmd = [f"{script}.py", "--data", args.data, "--out-dir", out, "--seed", str(seed), *(["--device", args.device] if args.device else []),
           *BUDGETS[args.budget][script], *extra.get(script, [])]
    text = " ".join(shlex.quote(c) for c in cmd)
    record = os.path.join(out, "real_data_run.json")  # the command and wall time of a finished run, for reuse
    if not args.overwrite and os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["command"] != text:
            return dict(script=script, seed=seed, seconds=0.0, error=f"{out} holds a run of another command ({done['command']}): "
                                                                     f"pass --overwrite, or another --out-dir")
        print(f"[real_data] reusing {out} (the same command, finished)", flush=True)
        seconds, rc, log = done["seconds"], 0, done["log"]
    else:
        print(f"[real_data] {text}", flush=True)
        log, t0 = os.path.join(args.out_dir, f"{script}_seed{seed}.log"), time.time()
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:], *(["--overwrite"] if args.overwrite else [])],
                                stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
    if rc != 0:  # one failed file does not stop the others; its row says where to look
        return dict(script=script, seed=seed, seconds=seconds, error=f"exit {rc}: see {log}")
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        head, base, shown = headline(script, metrics)
    except (OSError, KeyError, ValueError) as e:
        return dict(script=script, seed=seed, seconds=seconds, error=f"no bare-run metrics in {out} ({type(e).__name__}: {e})")
    with open(record, "w") as f:
        json.dump(dict(command=text, seconds=seconds, log=log), f)
    return dict(script=script, seed=seed, headline=head, baseline=base, direction=shown, seconds=seconds, command=text, metrics=metrics)


def main(args):
    extra = {}
    for spec in args.flags:
        script, sep, flags = spec.partition("=")
        if not sep or script not in SCRIPTS:
            raise UserError(f"--flags {spec}: expected SCRIPT=FLAGS with SCRIPT one of {', '.join(SCRIPTS)}")
        words = shlex.split(flags)
        own = [w for w in words if w.split("=", 1)[0] in OWN]
        if own:
            raise UserError(f"--flags {spec}: {own[0].split('=', 1)[0]} is set by real_data.py itself (use its own flag)")
        extra.setdefault(script, []).extend(words)
    os.makedirs(args.out_dir, exist_ok=True)
    date, where = time.strftime("%Y-%m-%d"), machine(args.device)
    rows = []

    def save():  # after every run: a crash or Ctrl-C keeps the rows of the runs before it
        with open(os.path.join(args.out_dir, "real_data.json"), "w") as f:
            json.dump(dict(settings=vars(args), date=date, machine=where, rows=rows), f, indent=1)
        with open(os.path.join(args.out_dir, "real_data.md"), "w") as f:
            f.write("\n".join(table(args, rows, date, where)) + "\n")
    for script in args.only:
        done = []
        for seed in args.seeds:
            row = one_run(args, script, seed, extra)
            rows.append(row)
            if "error" not in row:
                done.append(row)
                print(f"[real_data] {script} seed {seed}: {row['headline']} | {row['baseline']} | direction "
                      f"{'yes' if row['direction'] else 'no'} | {row['seconds']:.0f} s", flush=True)
            else:
                print(f"[real_data] {script} seed {seed}: {row['error']}", flush=True)
            save()
        if len(done) > 1:
            rows.append(mean_row(script, done))
            save()
    print("\n" + "\n".join(table(args, rows, date, where)))
    return rows


if __name__ == "__main__":
    run(main, build_parser())
