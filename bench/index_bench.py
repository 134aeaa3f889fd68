"""Index benchmark: build over the shared corpus, in-process lookup latency, side by side with REST's draftretriever.

    .venv/bin/python -m specstore.bench.index_bench [--corpus ../shared/data/corpus] [--queries 10000]
        [--embed-sample PATH] [--full-embeddings] [--synthetic-tokens 100000000] [--json OUT.json]

Workloads (the same query list is given to both systems):
  heldout   contexts sliding over the Spec-Bench prompts (text not in the corpus), <= 32 tokens each
  incorpus  32-token contexts ending at random positions of the corpus (always a full 16-token match)
draftretriever inserts every query into its index (its answers depend on earlier queries), so it gets a
fresh Reader per workload. REST's lookup loop is reproduced: spans 16..2, longest first, choices=64.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from ..datastore.index import DatastoreIndex
from ..indexers.build import BuildOptions, build_index


def pct(a, q):
    return float(np.percentile(np.asarray(a), q))


def heldout_queries(tok, n, rng, max_ctx=32):
    qfile = ROOT.parent / "shared" / "data" / "bench" / "spec-bench_question.jsonl"
    out = []
    for line in qfile.read_text().splitlines():
        rec = json.loads(line)
        for turn in rec.get("turns", []):
            ids = tok(turn, add_special_tokens=False)["input_ids"]
            for p in range(2, len(ids) + 1):
                out.append(np.asarray(ids[max(0, p - max_ctx):p], dtype=np.int64))
    idx = rng.permutation(len(out))[:n]
    return [out[i] for i in idx]


def incorpus_queries(ix, n, rng, ctx=32):
    s = ix.shards[0]
    T = s.tokens
    out = []
    while len(out) < n:
        p = int(rng.integers(ctx, s.n - 1))
        c = np.asarray(T[p - ctx:p], dtype=np.int64)
        if (c == s.sep).any():
            continue
        out.append(c)
    return out


def time_ours(ix, queries, budget=64, **kw):
    for q in queries[:200]:
        ix.retrieve(q, budget, **kw)
    lat, ml, nodes = [], [], []
    for q in queries:
        t = time.perf_counter()
        r = ix.retrieve(q, budget, **kw)
        lat.append(time.perf_counter() - t)
        ml.append(r.match_len)
        nodes.append(len(r))
    lat = np.asarray(lat) * 1e6
    return {"p50_us": pct(lat, 50), "p90_us": pct(lat, 90), "p99_us": pct(lat, 99), "mean_us": float(lat.mean()),
            "hit_rate": float(np.mean(np.asarray(ml) > 0)), "mean_match_len": float(np.mean(ml)),
            "mean_nodes": float(np.mean(nodes))}


def time_draftretriever(path, queries, choices=64, max_span=16):
    import draftretriever

    reader = draftretriever.Reader(str(path))   # fresh reader per workload: it inserts queries into its index
    lat, hit, nodes = [], [], []
    for q in queries:
        ql = q.tolist()
        t = time.perf_counter()
        got = None
        for span in range(min(max_span, len(ql)), 1, -1):
            res = reader.search(ql[-span:], choices=choices)
            if len(res[0]):
                got = res
                break
        lat.append(time.perf_counter() - t)
        hit.append(got is not None)
        nodes.append(len(got[2]) - 1 if got else 0)
    lat = np.asarray(lat) * 1e6
    return {"p50_us": pct(lat, 50), "p90_us": pct(lat, 90), "p99_us": pct(lat, 99), "mean_us": float(lat.mean()),
            "hit_rate": float(np.mean(hit)), "mean_nodes": float(np.mean(nodes))}


def build_draftretriever(ix, path):
    import draftretriever

    t = time.perf_counter()
    w = draftretriever.Writer(str(path), vocab_size=ix.vocab_size)
    for s in ix.shards:
        T = np.asarray(s.tokens)
        for j in range(len(s.doc_ids)):
            a, b = int(s.doc_starts[j]), int(s.doc_starts[j + 1]) - 1
            w.add_entry(T[a:b].astype(np.int64).tolist())
    w.finalize()
    return time.perf_counter() - t, path.stat().st_size


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus"))
    ap.add_argument("--work", default="/tmp/specstore-index-bench", help="scratch folder for the indexes")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--embed-sample", default=None,
                    help="measure the embed+FAISS stages on this input (default: <corpus>/deepseek-coder_mbpp.jsonl)")
    ap.add_argument("--full-embeddings", action="store_true", help="embed the whole corpus in the main build")
    ap.add_argument("--synthetic-tokens", type=int, default=0, help="also build/query a Zipf token index this big")
    ap.add_argument("--skip-draftretriever", action="store_true")
    ap.add_argument("--skip-embed-sample", action="store_true", help="do not measure the embed/FAISS stages")
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)

    from ..datastore.model_files import load_tokenizer

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = load_tokenizer()
    res = {"machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_avg_start": os.getloadavg()}

    # ---- 1. build over the whole corpus
    out = work / "corpus-idx"
    t = time.perf_counter()
    rep = build_index([args.corpus], out, BuildOptions(embeddings=args.full_embeddings, progress=False),
                      tokenizer=tok, log=lambda *_: None)
    wall = time.perf_counter() - t
    st = rep.manifest["stats"]
    res["build"] = {"wall_s": wall, "stage_s": rep.stage_seconds, "documents": st["num_documents"],
                    "tokens": st["num_tokens"], "tokens_per_s": st["num_tokens"] / wall,
                    "bytes_suffix_store": st["bytes_suffix_store"], "bytes_per_token": st["bytes_per_token"],
                    "bytes_faiss": st["bytes_faiss"], "bytes_total": dir_bytes(out)}
    print(json.dumps(res["build"], indent=1), flush=True)

    # ---- 2. embed + FAISS stage throughput on a sample
    if not args.full_embeddings and not args.skip_embed_sample:
        sample = args.embed_sample or str(Path(args.corpus) / "deepseek-coder_mbpp.jsonl")
        t = time.perf_counter()
        r2 = build_index([sample], work / "embed-sample", BuildOptions(progress=False), tokenizer=tok,
                         log=lambda *_: None)
        ntok = r2.manifest["stats"]["num_tokens"]
        res["embed_sample"] = {"input": sample, "tokens": ntok, "chunks": r2.manifest["faiss"]["num_vectors"],
                               "embed_s": r2.stage_seconds["embed"], "faiss_s": r2.stage_seconds["faiss"],
                               "embed_tokens_per_s": ntok / r2.stage_seconds["embed"],
                               "factory": r2.manifest["faiss"]["factory"],
                               "est_full_corpus_embed_s": st["num_tokens"] / (ntok / r2.stage_seconds["embed"])}
        print(json.dumps(res["embed_sample"], indent=1), flush=True)

    # ---- 3. lookups
    ix = DatastoreIndex.open(out, load_faiss=False)
    rng = np.random.default_rng(0)
    workloads = {"heldout": heldout_queries(tok, args.queries, rng), "incorpus": incorpus_queries(ix, args.queries, rng)}
    res["lookup"] = {}
    for name, qs in workloads.items():
        res["lookup"][name] = {"queries": len(qs), "ours": time_ours(ix, qs, args.budget)}
        print(name, json.dumps(res["lookup"][name]["ours"]), flush=True)

    # ---- 4. REST draftretriever side by side
    if not args.skip_draftretriever:
        dr = work / "draftretriever.idx"
        bt, size = build_draftretriever(ix, dr)
        res["draftretriever_build"] = {"build_s": bt, "bytes": size, "bytes_per_token": size / st["num_tokens"]}
        print("draftretriever build", json.dumps(res["draftretriever_build"]), flush=True)
        for name, qs in workloads.items():
            res["lookup"][name]["draftretriever"] = time_draftretriever(dr, qs, args.budget)
            print(name, "draftretriever", json.dumps(res["lookup"][name]["draftretriever"]), flush=True)

    # ---- 5. synthetic Zipf index
    if args.synthetic_tokens:
        n = args.synthetic_tokens
        V = ix.vocab_size
        zr = np.random.default_rng(1)
        t = time.perf_counter()
        toks = (zr.zipf(1.3, size=n) - 1) % V
        doc_len = 2048
        docs = [toks[i:i + doc_len] for i in range(0, n, doc_len)]
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        rs = build_index(None, work / "synthetic", BuildOptions(progress=False), token_docs=docs, vocab_size=V,
                         fingerprint="synthetic", log=lambda *_: None)
        del docs, toks
        wall = time.perf_counter() - t
        sx = DatastoreIndex.open(work / "synthetic")
        qs = incorpus_queries(sx, args.queries, rng)
        zq = [((zr.zipf(1.3, size=32) - 1) % V).astype(np.int64) for _ in range(args.queries)]
        res["synthetic"] = {"tokens": rs.manifest["stats"]["num_tokens"], "generate_s": gen_s, "build_s": wall,
                            "stage_s": rs.stage_seconds, "bytes_per_token": rs.manifest["stats"]["bytes_per_token"],
                            "incorpus": time_ours(sx, qs, args.budget), "zipf_random": time_ours(sx, zq, args.budget)}
        print("synthetic", json.dumps(res["synthetic"], indent=1), flush=True)

    res["load_avg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
