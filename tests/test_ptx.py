"""Every kvref CUDA kernel compiles to sm_90 PTX, with no GPU needed.

The CUDA simulator (tests_cuda/) runs kernels as Python and does no type checking, so it cannot show that a kernel,
and the spec functions it calls (``flat.write_one``, ``attention.attend_rows``, ``fp16.widen``'s overload,
``attention.exp_f32``), compile for a GPU. ``cuda.compile_ptx`` runs Numba's typing and NVVM without a driver and
does show it. It needs the CUDA 13 compiler libraries: ``pip install kvref[cu13]`` (numba-cuda[cu13]); without them
this test is skipped.

Every module ``kvref/cuda/<variant>.py`` lists its kernels in ``KERNELS = {name: (python_body, [signatures])}``,
and this test compiles each body for each signature. Attend kernels are specialised per shape (G, D: constants,
kvref/attention.py "Specialisation"), and ``KERNELS`` lists them for each shape of ``kvref.cuda.PTX_SHAPES``.

**How.** The compile runs in a child process (this file run as a script; ``python tests/test_ptx.py`` prints a
report), for three reasons: ``numba.cuda`` is never imported into the pytest process of ``tests/`` (kvref leaves the
choice simulator-or-GPU to the user, and it is fixed at import); the child ignores a ``NUMBA_ENABLE_CUDASIM`` set in
the environment; and the monkeypatch below never touches the test process.

**The monkeypatch (test-only, private API).** Compiling a kernel that calls device functions makes numba-cuda ask
the driver for the current device's compute capability (``numba.cuda.dispatcher.get_current_device`` in
``CUDADispatcher.compile_device``), which fails without a GPU ("CUDA driver library cannot be found"), even with
``cc=(9, 0)`` given. The child replaces that function with one returning an sm_90 stand-in while compiling, then
restores it. If a numba-cuda release renames it, the test fails and says so.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

CC = (9, 0)
MARK = "KVREF_PTX_RESULT "
INSTALL_HINT = "install kvref[cu13] (numba-cuda[cu13]) to compile kernels to PTX"


class _Sm90Device:
    """Stand-in for ``cuda.get_current_device()``: only the compute capability is read during compilation."""

    compute_capability = CC
    name = "sm_90 stand-in (compile only, no GPU)"


def _probe_kernel(a):
    a[0] = 1.0


def compile_all():
    """Compile every kernel of every kvref.cuda module; returns {"skip": reason|None, "kernels": [...], "failures":
    [...]}. Meant for a fresh process (see the module docstring)."""
    result = {"skip": None, "kernels": [], "failures": []}
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken
        result["skip"] = f"{INSTALL_HINT}: numba.cuda cannot be imported ({exc})"
        return result
    if getattr(cuda, "implementation", None) != "NVIDIA":
        result["skip"] = f"{INSTALL_HINT}: numba.cuda is numba's deprecated built-in target, not numba-cuda"
        return result
    try:  # a kernel with no device-function calls needs no driver: this only checks the compiler toolchain
        cuda.compile_ptx(_probe_kernel, "void(float32[::1])", cc=CC)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        result["skip"] = f"{INSTALL_HINT}; no CUDA compiler here: {type(exc).__name__}: {first_line[:120]}"
        return result

    import numba.cuda.dispatcher as dispatcher

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Sm90Device
    try:
        import kvref.cuda

        names = ["kvref.cuda"] + [f"kvref.cuda.{info.name}" for info in pkgutil.iter_modules(kvref.cuda.__path__)]
        for module_name in names:
            module = importlib.import_module(module_name)
            kernels = getattr(module, "KERNELS", None)
            if not kernels:
                result["failures"].append({"kernel": module_name, "signature": "-",
                                           "error": "module defines no KERNELS dict, so its kernels are unchecked"})
                continue
            for name, (body, signatures) in kernels.items():
                for sig in signatures:
                    entry = {"kernel": f"{module_name}:{name}", "signature": str(sig)}
                    try:
                        ptx, _ = cuda.compile_ptx(body, sig, cc=CC)
                    except Exception as exc:
                        result["failures"].append({**entry, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    entry.update(ptx_lines=ptx.count("\n"), entry_found=".entry" in ptx,
                                 target=next((ln.split()[1] for ln in ptx.splitlines()
                                              if ln.startswith(".target")), None))
                    result["kernels"].append(entry)
    finally:
        dispatcher.get_current_device = original
    return result


def _run_child():
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # compile for the real target whatever the parent's environment says
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    assert proc.returncode == 0 and lines, f"PTX child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len(MARK):])


def test_every_cuda_kernel_compiles_to_sm90_ptx():
    result = _run_child()
    if result["skip"]:
        pytest.skip(result["skip"])
    failures = "\n\n".join(f"{f['kernel']} {f['signature']}\n{f['error']}" for f in result["failures"])
    assert not result["failures"], f"kernels that do not compile for sm_90:\n{failures}"
    assert result["kernels"], "no kernels found in kvref.cuda"
    names = {k["kernel"] for k in result["kernels"]}
    assert "kvref.cuda.flat:flat.write" in names
    for variant in ("flat", "ring", "pooled", "two_tier"):  # every attend kernel, specialised for each PTX shape
        assert len({n for n in names if n.startswith(f"kvref.cuda.{variant}:{variant}.attend[")}) >= 4, names
    assert len({n for n in names if n.startswith("kvref.cuda:merge[")}) >= 4, names  # split-K's merge kernel
    for k in result["kernels"]:
        assert k["entry_found"] and k["target"] == "sm_90", k


if __name__ == "__main__":
    outcome = compile_all()
    if "--json" in sys.argv:
        print(MARK + json.dumps(outcome))
    else:
        if outcome["skip"]:
            print("skipped:", outcome["skip"])
        for k in outcome["kernels"]:
            print(f"ok    {k['kernel']}  {k['target']}  {k['ptx_lines']} PTX lines  {k['signature']}")
        for f in outcome["failures"]:
            print(f"FAIL  {f['kernel']}  {f['signature']}\n{f['error']}\n")
        sys.exit(1 if outcome["failures"] else 0)
