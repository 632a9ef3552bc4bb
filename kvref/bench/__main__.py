"""Command line of the benchmarks: ``python -m kvref.bench [--quick] [--out FILE | --write] [--check-only] [--gpu]``.

First the backend check (every backend against the float64 reference; exit status 1 if one fails, before anything
is timed), then the 1- and 2-thread cases, each in its own subprocess, then the report: to standard output by
default, to FILE with ``--out FILE``, to BENCHMARKS.md with ``--write``. ``--gpu`` runs the GPU benchmark instead
(:mod:`kvref.bench.gpu`): its report goes to standard output or FILE (``--write`` would overwrite BENCHMARKS.md with
the GPU section alone, so paste it in by hand).
"""

import argparse
import json
import os
import subprocess
import sys

REPORT_FILE = "BENCHMARKS.md"

DESCRIPTION = (
    "Benchmarks of kvref against NumPy and torch on this machine. First checks every backend of every cache "
    "variant against a float64 reference and stops with exit status 1 if one fails; then times the 1- and "
    "2-thread cases, each in its own subprocess, and prints the Markdown report to standard output. "
    f"Use --write to regenerate {REPORT_FILE}.")


def build_parser():
    """The argument parser (plain-text help)."""
    parser = argparse.ArgumentParser(prog="python -m kvref.bench", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="n = 1k and 4k only (a smoke run)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="FILE", default="-",
                        help="write the report to FILE; '-' (the default) prints it to standard output")
    target.add_argument("--write", dest="out", action="store_const", const=REPORT_FILE, default="-",
                        help=f"write the report to {REPORT_FILE} (same as --out {REPORT_FILE})")
    parser.add_argument("--check-only", action="store_true",
                        help="run only the backend check, print its result and exit (status 1 if a backend fails)")
    parser.add_argument("--gpu", action="store_true",
                        help="benchmark the CUDA kernels on this machine's GPU instead (kvref/bench/gpu.py): copy "
                             "bandwidth, every timed kernel checked first, attend and write bandwidth, torch SDPA "
                             "and FlashInfer beside them; without a GPU it says so and exits with status 0")
    parser.add_argument("--threads", type=int, default=0, help="(internal) run one thread count and print JSON")
    return parser


def print_check_row(row):
    """One line to stderr for a finished row of the backend check: ok / FAILED with its error, or skipped and why."""
    where = f"  {row['backend']:<6} {row['variant']:<8} {row['dtype']:<7}"
    if row["ok"] is None:
        print(f"{where} skipped: {row['reason']}", file=sys.stderr, flush=True)
    else:
        verdict = "ok" if row["ok"] else "FAILED"
        print(f"{where} {verdict}: max error {row['max_error']:.2e} (tolerance {row['tolerance']:.0e}, "
              f"{row['seconds']:.1f} s)", file=sys.stderr, flush=True)


def check_backends_first():
    """Check every backend against the float64 reference (kvref.check), print one line per backend, variant and
    dtype to stderr as each finishes, and return the rows that failed (ok False); unavailable backends (ok None)
    are skipped, not failures."""
    from ..check import check_backends

    print("checking every backend against the float64 reference before timing ...", file=sys.stderr, flush=True)
    rows = check_backends(progress=print_check_row)
    return [row for row in rows if row["ok"] is False]


def main(argv=None):
    """Check the backends, run the 1- and 2-thread benchmarks in subprocesses and print or write the report.
    Returns the exit status: 0, or 1 when the backend check fails (then nothing is timed)."""
    args = build_parser().parse_args(argv)
    from .cases import run_threads

    if args.gpu and args.out == REPORT_FILE:
        build_parser().error(f"--gpu writes its own section, not all of {REPORT_FILE}: use --out FILE and paste it in")
    if args.gpu:
        from .gpu import main as gpu_main

        return gpu_main(quick=args.quick, out=args.out)
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    if args.threads:
        print(json.dumps(run_threads(args.threads, sizes, args.quick)))
        return 0
    failed = check_backends_first()
    if failed:
        names = ", ".join(f"{row['backend']} {row['variant']} {row['dtype']}" for row in failed)
        print(f"kvref.bench: backend check failed ({names}); nothing was timed", file=sys.stderr)
        return 1
    if args.check_only:
        return 0
    from .measure import machine_info
    from .report import report

    results = []
    for threads in (1, 2):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "kvref.bench", "--threads", str(threads)] + (["--quick"] if args.quick else [])
        print(f"running {threads}-thread benchmarks ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    machine = machine_info()
    machine["numba"] = results[0]["numba"]
    machine["torch"] = results[0]["torch"] or "not installed"
    text, targets = report(results, machine)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        met = sum(1 for _, _, ok in targets if ok)
        print(f"wrote {args.out} ({met} of {len(targets)} targets met)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
