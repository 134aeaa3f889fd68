"""Compiled inner loops of a lookup (numba, cached on disk after the first compile).

A lookup is a chain of small steps (narrow a suffix-array range token by token, count ~64 continuation
rows into a trie, prune, cut). In numpy each step is a handful of calls of ~1 us of fixed overhead on
arrays of a few hundred elements, so the overhead, not the work, set the latency (~60 us). Here the same
steps are plain loops: a lookup costs ~10 us. ``nogil`` lets several server threads run lookups at once.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _narrow(T, sa, lo, hi, k, c):
    """The rows of ``sa[lo:hi]`` (which share their first k backward tokens) whose (k+1)-th backward token
    ``T[sa[r] - k]`` is ``c``: it is sorted inside the range, so two binary searches give (new lo, new hi)."""
    a = lo
    b = hi
    while a < b:
        mid = (a + b) >> 1
        if np.int64(T[np.int64(sa[mid]) - k]) < c:
            a = mid + 1
        else:
            b = mid
    nlo = a
    b = hi
    while a < b:
        mid = (a + b) >> 1
        if np.int64(T[np.int64(sa[mid]) - k]) <= c:
            a = mid + 1
        else:
            b = mid
    return nlo, a


@njit(cache=True, nogil=True)
def backward_range(T, sa, buckets, rev, vocab):
    """Longest prefix of ``rev`` (a context reversed, int64) found backward in one shard.

    T: [n] uint16/uint32 tokens; sa: [n] int32 reverse suffix array (positions sorted by the backward
    string from each position); buckets: [vocab + 1] int64 row range of each one-token pattern.
    Returns (m, lo, hi): m matched tokens (0 = none), and the rows ``sa[lo:hi]`` are the positions of the
    last matched token of every occurrence. Rows in a range share their first k backward tokens, so the
    (k+1)-th backward token ``T[sa[r] - k]`` is sorted inside it: two binary searches narrow it. Real
    tokens never equal the separator, so a match never crosses one (and ``sa[r] - k`` stays >= 0: T[0]
    is a separator).
    """
    L = rev.shape[0]
    if L == 0:
        return 0, 0, 0
    c0 = rev[0]
    if c0 < 0 or c0 >= vocab:
        return 0, 0, 0
    lo = buckets[c0]
    hi = buckets[c0 + 1]
    if lo >= hi:
        return 0, 0, 0
    k = 1
    while k < L:
        c = rev[k]
        if c < 0 or c >= vocab:
            break
        nlo, nhi = _narrow(T, sa, lo, hi, k, c)
        if nlo >= nhi:
            break
        lo = nlo
        hi = nhi
        k += 1
    return k, lo, hi


@njit(cache=True, nogil=True)
def ranked_matches(T, sa, buckets, rev, vocab, sep, min_len, max_matches, out_len, out_pos):
    """The ``max_matches`` best occurrences of a context's end (``rev``: the context reversed) that match at
    least ``min_len`` tokens and have a next token: longer first, then later (newer) positions.

    The ranges of match lengths 1..m are nested, so one walk records them all; the occurrences of exactly
    length k are range k minus range k+1. Fills out_len / out_pos ([max_matches] int64: match length,
    position of the last matched token) and returns how many it filled.
    """
    L = rev.shape[0]
    los = np.empty(L + 1, np.int64)
    his = np.empty(L + 1, np.int64)
    m = 0
    if L > 0 and 0 <= rev[0] < vocab and buckets[rev[0]] < buckets[rev[0] + 1]:
        los[1] = buckets[rev[0]]
        his[1] = buckets[rev[0] + 1]
        m = 1
        while m < L:
            c = rev[m]
            if c < 0 or c >= vocab:
                break
            nlo, nhi = _narrow(T, sa, los[m], his[m], m, c)
            if nlo >= nhi:
                break
            m += 1
            los[m] = nlo
            his[m] = nhi
    got = 0
    k = m
    plo = los[m] if m > 0 else 0
    phi = plo
    while k >= min_len and got < max_matches:
        lo = los[k]
        hi = his[k]
        cand = np.empty((plo - lo) + (hi - phi), np.int64)
        n = 0
        for r in range(lo, plo):
            q = np.int64(sa[r])
            if np.int64(T[q + 1]) != sep:
                cand[n] = q
                n += 1
        for r in range(phi, hi):
            q = np.int64(sa[r])
            if np.int64(T[q + 1]) != sep:
                cand[n] = q
                n += 1
        cand = np.sort(cand[:n])
        take = min(n, max_matches - got)
        for i in range(take):
            out_len[got] = k
            out_pos[got] = cand[n - 1 - i]
            got += 1
        plo = lo
        phi = hi
        k -= 1
    return got


@njit(cache=True, nogil=True)
def count_and_cut(C, fdoc, fmem, budget, min_prob, hint_tok, hint_prob, hint_left, hint_veto):
    """Count continuation rows into a trie, estimate, prune and cut it (see ``index.build_tree``).

    C: [M, D] int64 tokens (-1 after a row's end); fdoc, fmem: [M] bool row flags; hint_tok: sorted int64
    first-token hint (may be empty) with hint_prob aligned; hint_left: the probability of a token the
    hint lacks; hint_veto: drop first tokens the hint lacks.
    Returns (tokens int32, parents int32, probs float32, in_doc bool, in_mem bool), nodes in creation
    order (parents first), or empty arrays.
    """
    M, D = C.shape
    cap = M * D
    tok = np.empty(cap, np.int64)
    par = np.empty(cap, np.int64)
    cnt = np.zeros(cap, np.float64)
    first_child = np.full(cap, -1, np.int64)
    last_child = np.full(cap, -1, np.int64)
    next_sib = np.full(cap, -1, np.int64)
    ndoc = np.zeros(cap, np.bool_)
    nmem = np.zeros(cap, np.bool_)
    root_first = -1
    root_last = -1
    nn = 0
    for r in range(M):
        cur = -1
        for d in range(D):
            t = C[r, d]
            if t < 0:
                break
            ch = root_first if cur < 0 else first_child[cur]
            while ch >= 0 and tok[ch] != t:
                ch = next_sib[ch]
            if ch < 0:
                ch = nn
                nn += 1
                tok[ch] = t
                par[ch] = cur
                if cur < 0:
                    if root_last >= 0:
                        next_sib[root_last] = ch
                    else:
                        root_first = ch
                    root_last = ch
                else:
                    if last_child[cur] >= 0:
                        next_sib[last_child[cur]] = ch
                    else:
                        first_child[cur] = ch
                    last_child[cur] = ch
            cnt[ch] += 1.0
            if fdoc[r]:
                ndoc[ch] = True
            if fmem[r]:
                nmem[ch] = True
            cur = ch
    prob = np.empty(nn, np.float64)
    pp = np.empty(nn, np.float64)
    alive = np.empty(nn, np.bool_)
    na = 0
    nh = hint_tok.shape[0]
    for i in range(nn):
        p = par[i]
        pr = cnt[i] / (M if p < 0 else cnt[p])
        ok = True
        if p < 0 and nh > 0:
            j = np.searchsorted(hint_tok, tok[i])
            hit = j < nh and hint_tok[j] == tok[i]
            h = hint_prob[j] if hit else hint_left
            pr = math.sqrt(pr * h)
            if hint_veto and not hit:
                ok = False
        prob[i] = pr
        ok = ok and pr >= min_prob and (p < 0 or alive[p])
        alive[i] = ok
        pp[i] = pr if p < 0 else pr * pp[p]
        if ok:
            na += 1
    cand = np.empty(na, np.int64)
    j = 0
    for i in range(nn):
        if alive[i]:
            cand[j] = i
            j += 1
    if na > budget:
        # best path probability first, ties to the older node (so a parent always precedes its child)
        order = np.argsort(-pp[cand], kind="mergesort")[:budget]
        sel = np.sort(cand[order])
    else:
        sel = cand
    n = sel.shape[0]
    remap = np.full(nn, -1, np.int64)
    out_tok = np.empty(n, np.int32)
    out_par = np.empty(n, np.int32)
    out_prob = np.empty(n, np.float32)
    out_doc = np.empty(n, np.bool_)
    out_mem = np.empty(n, np.bool_)
    for k in range(n):
        i = sel[k]
        remap[i] = k
        out_tok[k] = tok[i]
        p = par[i]
        out_par[k] = -1 if p < 0 else remap[p]
        out_prob[k] = prob[i]
        out_doc[k] = ndoc[i]
        out_mem[k] = nmem[i]
    return out_tok, out_par, out_prob, out_doc, out_mem


@njit(cache=True, nogil=True)
def corpus_rows(T, sep, pos, C, r0):
    """Row r0 + i of C (pre-filled with -1) = the tokens after position pos[i] of a shard, up to C's width,
    stopping at the first separator (the last token of a shard is one, so reads stay inside)."""
    n = T.shape[0]
    for j in range(pos.shape[0]):
        p = pos[j]
        for d in range(C.shape[1]):
            t = np.int64(T[min(p + 1 + d, n - 1)])
            if t == sep:
                break
            C[r0 + j, d] = t


@njit(cache=True, nogil=True)
def memory_rows(mem, q, C, r0):
    """Row r0 + i of C (pre-filled with -1) = the tokens after position q[i] of the memory, up to C's width
    or the memory's end."""
    L = mem.shape[0]
    for j in range(q.shape[0]):
        for d in range(C.shape[1]):
            i = q[j] + 1 + d
            if i >= L:
                break
            C[r0 + j, d] = mem[i]


@njit(cache=True, nogil=True)
def memory_suffix_matches(mem, max_span):
    """Longest suffix of ``mem`` (<= max_span tokens) occurring earlier in it with a token after it.

    Returns (m, q): m matched tokens (0 = none), q int64 ascending end positions of those occurrences.
    """
    L = mem.shape[0]
    limit = min(max_span, L - 1)
    best = 0
    n = 0
    q = np.empty(max(L - 1, 0), np.int64)
    if limit < 1:
        return 0, q[:0]
    last = mem[L - 1]
    for p in range(L - 1):
        if mem[p] != last:
            continue
        k = 1
        while k < limit and k <= p and mem[p - k] == mem[L - 1 - k]:
            k += 1
        if k > best:
            best = k
            n = 0
        if k == best:
            q[n] = p
            n += 1
    return best, q[:n]


@njit(cache=True, nogil=True)
def lookup_one_shard(T, sa, buckets, rev, vocab, sep, mem, mem_span, mem_matches, max_matches, depth, min_span,
                     budget, min_prob, hint_tok, hint_prob, hint_left, hint_veto):
    """The whole of ``DatastoreIndex.retrieve`` for the common case, in one call: one shard, no document
    filter (same semantics as the general path; tests check both against brute force). The hint arguments
    are those of ``count_and_cut``.

    mem: the session memory (ending with the context; empty = none), searched up to ``mem_span`` tokens.
    Returns (match length, tokens, parents, probs, in_doc, in_mem); match length 0 = no usable match.
    """
    m, lo, hi = backward_range(T, sa, buckets, rev, vocab)
    mm = 0
    q = np.empty(0, np.int64)
    if mem.shape[0] >= 2 and mem_matches > 0:
        mm, q = memory_suffix_matches(mem, mem_span)
    best = max(m, mm)
    e_tok = np.empty(0, np.int32)
    e_prob = np.empty(0, np.float32)
    e_flag = np.empty(0, np.bool_)
    if best == 0 or best < max(1, min_span):
        return 0, e_tok, e_tok, e_prob, e_flag, e_flag
    n_corpus = 0
    if m == best:
        n_corpus = min(hi - lo, max_matches)
    n_mem = 0
    if mm == best:
        n_mem = min(q.shape[0], mem_matches)
    M = n_corpus + n_mem
    C = np.full((M, depth), -1, np.int64)
    fdoc = np.zeros(M, np.bool_)
    fmem = np.zeros(M, np.bool_)
    cnt = hi - lo
    pos = np.empty(n_corpus, np.int64)
    for r in range(n_corpus):
        pos[r] = sa[lo + (r * cnt) // n_corpus]          # evenly spread over all occurrences
    corpus_rows(T, sep, pos, C, 0)
    memory_rows(mem, q[q.shape[0] - n_mem:], C, n_corpus)   # the most recent occurrences
    fmem[n_corpus:] = True
    tok, par, prob, ind, inm = count_and_cut(C, fdoc, fmem, budget, min_prob, hint_tok, hint_prob, hint_left,
                                             hint_veto)
    return best, tok, par, prob, ind, inm
