"""Benchmarks: ``python -m kvref.bench`` checks every backend, then measures and prints a Markdown report.

Before it times anything, it checks every available backend of every cache variant against the float64 reference
(:func:`kvref.check.check_backends`) and stops with exit status 1 if one fails. The report goes to standard output;
``--out FILE`` writes it to FILE, and ``--write`` to BENCHMARKS.md (the committed report is regenerated only when
asked). ``--check-only`` runs the check alone, ``--quick`` is a smoke run (n = 1k and 4k).

Everything is measured side by side in one run and reported as ratios, never as absolute goals:

* the strict read limit of one thread (the best pass of a compiled sequential int64 sum over 1 GiB), the yardstick
  every bandwidth figure and target is judged against, and the older, weaker STREAM-like read (sum) and copy, with
  1 and with 2 threads, reported beside it;
* decode attention (one query token, 32 query heads, head_dim 128, 8 or 32 KV heads, fp32 and fp16,
  n = 1k, 4k, 16k, 64k cached tokens) for kvref-cpu, plain NumPy, torch SDPA and torch matmul+softmax. Each as
  time, GB/s of K/V read, fraction of the in-run read bandwidth of the same thread count, and ratio vs each peer;
* appending one token at context length n to a kvref FlatCache vs Hugging Face-style ``torch.cat`` growth;
* ring vs flat decode attention over the same number of visible keys (a wrapped RingCache of window n vs a
  FlatCache of n tokens), and the measured ``nbytes`` of a ring as n grows past its window;
* pooled (paged, blocks of 16 scattered over the pool) vs flat decode attention, and the measured bytes of a batch
  of mixed-length sequences in a FlatCache vs a PooledCache;
* ggml quantization (1 thread): kvref-cpu ``quant.quantize`` / ``dequantize`` vs the ``gguf`` package's NumPy
  quantizers, with the bytes checked identical;
* two-tier decode attention (Q8_0 and Q4_0 store, 256-token fp16 tail) vs flat fp16 attention over the same n keys;
* the assembly of every attention specialisation the run compiled: packed (zmm / ymm / xmm) and scalar FMAs in its
  innermost loops, flagged "SCALAR FALLBACK" when LLVM did not vectorise them (``python -m kvref.bench.asm`` does
  this alone, on tiny caches, without timing anything).

Caches are rotated (at least 256 MiB in all) so that no timing is served from the 32 MiB L3.
Each thread count runs in its own subprocess, with NUMBA/OMP/OpenBLAS thread counts set before import.

Modules: :mod:`kvref.bench.measure` (timing, bandwidth and the strict read limit, machine), :mod:`kvref.bench.cases`
(what is measured), :mod:`kvref.bench.asm` (the assembly verdicts), :mod:`kvref.bench.report` (the Markdown),
``kvref/bench/__main__.py`` (the command line).
"""
