#!/usr/bin/env python3
"""How often the fused kernel's slow path runs on a trained model's real K/V.

The fused kernel decodes each 32-token chunk of a block without a per-group slow-path test and decodes a chunk
again (V: three passes) when a lane met a slow pair: PAIR_ESC (a pair with a code over 14 << k or an escaped value,
or a pair symbol the codebook has no codeword for, e.g. one its prefill never showed) or a codeword too long to
carry its pair's low bits in the table (L + 2k > 11). This script fills kvcomp caches through the perplexity
harness (the tiny Llama on validation windows, `bench/perplexity.py`'s variants), reads every stored block back
(Cache.read_block, Cache.codebook) and walks its lane streams on the CPU, as format.hpp defines them: per (K|V) the
share of slow pairs and of chunks the kernel decodes again.

    PYTHONPATH=build-py/python python3 bench/slow_path_count.py --windows 4 --variants "kvcomp:eb=0.05 kvcomp:eb=0.1,l0=0.05"
"""
import argparse
import os
import struct
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perplexity as harness  # noqa: E402
import study_common as study  # noqa: E402

MAX_LEN = 11        # format::kMaxCodeLen
PAIR_ESC = 225      # format::kPairEscape
FIELD_BITS, RAW_BITS, ESC = 8, 32, 255


def decode_table(lengths, k):
    """index (next 11 stream bits, LSB first) -> (symbol, length, slow), canonical as huffman_build.cuh."""
    count = [0] * (MAX_LEN + 1)
    for n in lengths:
        if n:
            count[n] += 1
    first, code = [0] * (MAX_LEN + 1), 0
    for n in range(1, MAX_LEN + 1):
        code = (code + count[n - 1]) << 1
        first[n] = code
    table = [None] * (1 << MAX_LEN)
    rank = [0] * (MAX_LEN + 1)
    for s, n in enumerate(lengths):
        if not n:
            continue
        c = first[n] + rank[n]
        rank[n] += 1
        rev = int(format(c, f"0{n}b")[::-1], 2)  # stored bit-reversed: the decoder reads its low bits first
        slow = s == PAIR_ESC or n + 2 * k > MAX_LEN
        for hi in range(1 << (MAX_LEN - n)):
            table[rev | (hi << n)] = (s, n, slow)
    return table


def walk_block(data, kind_key, T, D, table, k):
    """Per lane, per chunk: whether the lane met a slow pair. Returns (pairs, slow pairs, chunks, slow chunks)."""
    groups = D if kind_key else T
    lane_at = 8 + 4 * groups
    lane_bits = struct.unpack_from("<32H", data, lane_at)
    payload = int.from_bytes(data[lane_at + 64:], "little")
    per_chunk = D // 2  # pairs a lane holds of one 32-token chunk
    chunks = T // 32
    slow_chunk = [False] * chunks
    pairs = slow_pairs = 0
    start = 0
    for lane in range(32):
        pos = start
        for p in range(chunks * per_chunk):
            s, n, slow = table[(payload >> pos) & ((1 << MAX_LEN) - 1)]
            pos += n
            if s == PAIR_ESC:
                for _ in range(2):
                    f = (payload >> pos) & 0xFF
                    pos += FIELD_BITS + (RAW_BITS if f == ESC else 0)
            else:
                pos += 2 * k
            pairs += 1
            if slow:
                slow_pairs += 1
                slow_chunk[p // per_chunk] = True
        assert pos - start == lane_bits[lane], f"lane {lane}: walked {pos - start} bits, table says {lane_bits[lane]}"
        start = pos
    return pairs, slow_pairs, chunks, sum(slow_chunk)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(study.ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", default=None)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--variants", default="kvcomp:eb=0.05 kvcomp:eb=0.1,l0=0.05")
    args = ap.parse_args()
    import kvcomp
    hf, model, tok = study.load_model(args.model)
    W = model.config.max_position_embeddings
    x = harness.windows_of(tok, study.text_path(args.text, "valid.txt"), args.windows, W)[0].cuda()
    print(f"{args.windows} windows x {W} tokens; per (K|V): slow pairs, chunks decoded again")
    print("| variant | K slow pairs | K slow chunks | V slow pairs | V slow chunks | low bits k (K, V) |")
    print("|---|---:|---:|---:|---:|---|")
    for spec in args.variants.split():
        tot = {True: [0, 0, 0, 0], False: [0, 0, 0, 0]}
        ks = set()
        for w in range(x.shape[0]):
            cache = harness.make_cache(spec, model, kvcomp, hf)
            with torch.no_grad():
                model(x[w:w + 1], past_key_values=cache, use_cache=True)
            c, seq, T, D = cache.cache, cache.seqs[0], cache.config.block_tokens, cache.config.head_dim
            blocks = c.tokens(seq, 0) // T
            for layer in range(cache.config.layers):
                for head in range(cache.config.kv_heads):
                    for kind in (kvcomp.Kind.Key, kvcomp.Kind.Value):
                        book = c.codebook(layer, head, kind)
                        k = book.low_bits
                        ks.add((kind == kvcomp.Kind.Key, k))
                        table = decode_table(list(book.lengths), k)
                        for b in range(blocks):
                            data = bytes(c.read_block(layer, seq, head, b, kind, 0))
                            r = walk_block(data, kind == kvcomp.Kind.Key, T, D, table, k)
                            for i in range(4):
                                tot[kind == kvcomp.Kind.Key][i] += r[i]
            del cache
            torch.cuda.empty_cache()
        cells = []
        for key in (True, False):
            p, sp, ch, sch = tot[key]
            cells += [f"{sp} of {p} ({100.0 * sp / max(1, p):.4f}%)", f"{sch} of {ch} ({100.0 * sch / max(1, ch):.2f}%)"]
        kk = sorted({k for isk, k in ks if isk}), sorted({k for isk, k in ks if not isk})
        print(f"| {spec} | " + " | ".join(cells) + f" | {kk[0]}, {kk[1]} |", flush=True)


if __name__ == "__main__":
    main()
