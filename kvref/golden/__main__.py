"""python -m kvref.golden write|check|list|show: the golden suite from the command line.

  write DIR [--size default|large]     write a suite (the committed one is golden/v1, size default); needs gguf
        [--no-gguf]                    for the independent check of quantized bytes, unless --no-gguf
  check DIR --impl module:object       check an implementation; exit 0 only if every case it supports passes
        [--case NAME ...] [--verbose]  (1: a failure, or no case ran; 2: a broken suite or a bad --impl)
  list DIR                             one line per case: kind, variant, steps, description
  show DIR CASE                        a case's config, and each step's op, args and tensors with tolerances

The format is described in docs/golden-format.md; the calling convention of an implementation in
kvref/golden/impl.py (and the same doc).
"""

import argparse
import json
import sys

from .format import SuiteError, find_case, load_case, read_manifest


def cmd_write(args):
    from .write import GoldenWriteError, cross_check_note, write_suite

    try:
        manifest = write_suite(args.dir, args.size, lambda name: print(f"  wrote {name}", flush=True),
                               require_gguf=not args.no_gguf)
    except GoldenWriteError as exc:
        print(f"not written: {exc}", file=sys.stderr)
        return 1
    print(f"{len(manifest['cases'])} cases in {args.dir} (format {manifest['format']} "
          f"{manifest['format_version']}, kvref {manifest['kvref_version']}); {cross_check_note()}")
    return 0


def cmd_check(args):
    from .run import check_suite, describe, exit_status, format_table, load_impl

    try:
        impl = load_impl(args.impl)
    except Exception as exc:
        print(f"cannot load --impl {args.impl}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    manifest, results = check_suite(args.dir, impl, args.case)
    print(f"suite {args.dir}: format {manifest['format']} {manifest['format_version']}, written by kvref "
          f"{manifest['kvref_version']}; implementation: {describe(impl)}\n")
    print(format_table(results, verbose=args.verbose))
    return exit_status(results)


def cmd_list(args):
    manifest = read_manifest(args.dir)
    for case in manifest["cases"]:
        print(f"{case['name']:38} {case['kind']:16} {case['variant'] or '-':9} {len(case['steps']):3} steps  "
              f"{case['description']}")
    return 0


def cmd_show(args):
    manifest = read_manifest(args.dir)
    case = find_case(manifest, args.case)
    tensors = load_case(args.dir, case)
    print(f"{case['name']} ({case['kind']}{', ' + case['variant'] if case['variant'] else ''}): "
          f"{case['description']}")
    print(f"file {case['file']}, sha256 {case['sha256']}; expected values from {case['expected_from']}")
    print(f"config: {json.dumps(case['config'])}")
    for step in case["steps"]:
        error = f"  -> must raise ({step['error']} in kvref), state unchanged" if step["error"] else ""
        print(f"\n{step['name']}: {step['op']} {json.dumps(step['args'])}{error}")
        for group in ("inputs", "expected", "logical", "physical"):
            for name, desc in step[group].items():
                tolerance = "" if group == "inputs" else (
                    "exact" if desc["atol"] == desc["rtol"] == 0 else f"atol {desc['atol']:g} rtol {desc['rtol']:g}")
                array = tensors[desc["tensor"]]
                preview = ""
                if array.ndim <= 2 and array.size <= 24:
                    preview = " = " + " ".join(str(array.tolist()).split())
                print(f"  {group:9} {desc['tensor']:36} {desc['dtype']:8} {str(tuple(desc['shape'])):22} "
                      f"{tolerance}{preview}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kvref.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write", help="write a suite into DIR")
    p.add_argument("dir")
    p.add_argument("--size", choices=("default", "large"), default="default")
    p.add_argument("--no-gguf", action="store_true", help="write without the gguf package (quantized bytes then "
                   "checked against kvref's own quantizer only)")
    p.set_defaults(run=cmd_write)
    p = sub.add_parser("check", help="check an implementation against the suite in DIR")
    p.add_argument("dir")
    p.add_argument("--impl", required=True, help="module:object (or path/to/file.py:object)")
    p.add_argument("--case", action="append", help="check only this case (repeatable)")
    p.add_argument("--verbose", action="store_true", help="a row per tensor, not only per case")
    p.set_defaults(run=cmd_check)
    p = sub.add_parser("list", help="list the cases of the suite in DIR")
    p.add_argument("dir")
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("show", help="show one case")
    p.add_argument("dir")
    p.add_argument("case")
    p.set_defaults(run=cmd_show)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SuiteError as exc:
        print(f"broken suite: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
