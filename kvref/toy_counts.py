"""Exact work counts of the toy decoder (kvref/toy.py): token-computations and query-key dot products.

:func:`token_computations` and :func:`attention_dot_products` give the closed forms for a greedy generation of N
tokens after a P-token prompt, with and without a KV cache (and with a sliding window W); :class:`Work` is what the
forward passes record call by call, and the tests check that the two agree exactly. This is how seed 002's claim is
checked: generating 100 tokens after a 50-token prompt costs 9,950 token-computations without a cache and 150 with
one, about 66x, not the 33x of the seed.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import ShapeError
from .shapes import check_positive_int


def check_window(window, sinks, window_name="window", sinks_name="sinks"):
    """ShapeError unless window is an int >= 0 and sinks an int with 0 <= sinks < window (sinks = 0 if window = 0)."""
    for name, value in ((window_name, window), (sinks_name, sinks)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ShapeError(name, "an integer >= 0", repr(value))
    if window == 0 and sinks != 0:
        raise ShapeError(sinks_name, f"0 when {window_name} is 0 (full attention has no sinks)", int(sinks))
    if window > 0 and sinks >= window:
        raise ShapeError(sinks_name, f"an integer in [0, {window_name}={int(window)})", int(sinks))


def keys_read(positions, window):
    """Keys each query at ``positions`` reads: min(position + 1, W), or position + 1 without a window (W = 0).
    Sinks do not change the count: S sinks + the last W - S positions are still W keys once position >= W - 1."""
    positions = np.asarray(positions, np.int64)
    return positions + 1 if window <= 0 else np.minimum(positions + 1, window)


def _visible_pairs(T, window):
    """True entries of ``attention_mask(T, window, sinks)``: sum_{i<T} min(i + 1, W) (T (T + 1) / 2 if W = 0)."""
    if window <= 0 or T <= window:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


@dataclass
class Work:
    """Work recorded by the forward passes, one entry per forward call (a prefill chunk or a decode step).

    step_tokens[s]:        tokens run through all layers by call s (token-computations of that call)
    step_dot_products[s]:  query-key dot products of call s, summed over layers and query heads. Only visible
                           pairs count: a query at position p reads p + 1 keys, min(p + 1, W) with a window W.
    """

    step_tokens: list = field(default_factory=list)
    step_dot_products: list = field(default_factory=list)

    @property
    def token_computations(self):
        """Total token-computations: sum(step_tokens)."""
        return int(sum(self.step_tokens))

    @property
    def dot_products(self):
        """Total query-key dot products: sum(step_dot_products)."""
        return int(sum(self.step_dot_products))

    def record(self, tokens, dot_products):
        """Append one forward call's counts."""
        self.step_tokens.append(int(tokens))
        self.step_dot_products.append(int(dot_products))


def token_computations(prompt_len, new_tokens, use_cache, commit_last=True):
    """Token-computations to generate N = ``new_tokens`` tokens greedily after a prompt of P = ``prompt_len``.

    One token-computation = one token run through every layer (its projections, attention and MLP).

    Without a cache (``use_cache=False``), new token n (n = 1..N) comes from a full forward pass over the P + n - 1
    tokens before it (prompt plus new tokens 1..n-1). The last new token is never fed: nothing needs its output.

        total = sum_{n=1..N} (P + n - 1) = N (P - 1) + N (N + 1) / 2        P=50, N=100: 4,900 + 5,050 = 9,950

    With a cache, every token passes through the model once: a prefill of the P prompt tokens (its last logits give
    new token 1), then decode step n = 1..N feeds new token n alone (its logits give token n + 1). Steps 1..N-1 are
    needed for the N tokens; step N (``commit_last``) feeds the last new token too, so that the cache ends holding all
    P + N tokens (what a chat engine keeps for the next turn, and what seed 002's "prefill, then one token per
    generated token" counts). It costs one token-computation; its no-cache counterpart would be a full recompute of
    P + N tokens, which the no-cache count above leaves out.

        total = P + N - 1 + commit_last                                     P=50, N=100: 150 (149 without the commit)

    Ratio for P=50, N=100: 9,950 / 150 = 66.3x (66.8x like for like). Seed 002 said 5,050 vs 150, "33x".
    """
    P, N = _check_counts(prompt_len, new_tokens)
    if use_cache:
        return P + N - 1 + int(bool(commit_last))
    return N * (P - 1) + N * (N + 1) // 2


def attention_dot_products(prompt_len, new_tokens, use_cache, layers=1, q_heads=1, commit_last=True, window=0):
    """Query-key dot products (visible causal pairs) of the same generation as :func:`token_computations`.

    A query at absolute position p (0-based) reads the keys of positions 0..p: p + 1 dot products per query head
    per layer. Every count below is multiplied by ``layers * q_heads``.

    With a cache, decode step n (feeding new token n at position P + n - 1) does P + n dot products: O(n) per step.
    The prefill does 1 + 2 + ... + P = P (P + 1) / 2. With the commit step, the total is the causal triangle of the
    whole sequence, each pair computed exactly once:

        total = P (P + 1) / 2 + sum_{n=1..N-1+c} (P + n)         c = commit_last
              = (P + N) (P + N + 1) / 2                          when c = 1

    Without a cache, the pass for new token n recomputes the causal triangle of its T = P + n - 1 tokens,
    T (T + 1) / 2 dot products: O(n^2) per step, O(n^3) in all:

        total = sum_{T=P..P+N-1} T (T + 1) / 2 = [(P+N-1)(P+N)(P+N+1) - (P-1) P (P+1)] / 6

    (A dense masked implementation computes T^2 scores per pass and discards the masked ones; they are not counted.)

    With a sliding window W > 0 (``window``; sinks do not change the count) a query reads min(p + 1, W) keys, so a
    pass over T tokens does V(T) = sum_{i<T} min(i + 1, W) dot products (T (T + 1) / 2 while T <= W, then W per
    extra token) and the totals become V(P + N - 1 + c) with a cache and sum_{T=P..P+N-1} V(T) without.
    """
    P, N = _check_counts(prompt_len, new_tokens)
    check_positive_int("layers", layers)
    check_positive_int("q_heads", q_heads)
    check_window(window, 0)
    if window > 0:
        if use_cache:
            per_head = _visible_pairs(P + N - 1 + int(bool(commit_last)), window)
        else:
            per_head = sum(_visible_pairs(T, window) for T in range(P, P + N))
    elif use_cache:
        decode_steps = N - 1 + int(bool(commit_last))
        per_head = P * (P + 1) // 2 + decode_steps * P + decode_steps * (decode_steps + 1) // 2
    else:
        per_head = ((P + N - 1) * (P + N) * (P + N + 1) - (P - 1) * P * (P + 1)) // 6
    return per_head * layers * q_heads


def _check_counts(prompt_len, new_tokens):
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("new_tokens", new_tokens)
    return int(prompt_len), int(new_tokens)
