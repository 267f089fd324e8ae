#!/usr/bin/env python3
"""Design study for the quantizer (an EMULATION, not the library): decorrelate K and V with a PCA basis per
(layer, kv head) fitted on training text, and/or bound every group by one absolute error per (layer, kv head,
K|V) instead of eb x the group's range (reverse water-filling: components whose spread is below the bound cost
almost nothing). The library's scheme otherwise (bench/tail_study.py, mode=today: K per channel over 64-token
blocks, V per token, fp16 open tail); bytes estimated as there.

  rot=none|hadamard|pca   basis (pca: eigenvectors of the uncentred second moments of K, V on --train text)
  bound=rel|abs           rel: eb x group range (the library); abs: eb x the RMS of that (layer, head, K|V)
                          on the training text, for every group

    PYTHONPATH=build-py/python python3 bench/transform_study.py --windows 16 \
        --variants "rot=none,bound=rel,eb=0.1 rot=pca,bound=abs,eb=0.3"
"""
import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import perplexity as harness  # noqa: E402
import tail_study  # noqa: E402
from quantizer_study import hadamard  # noqa: E402


def first_existing(*paths):
    return next((p for p in paths if p and os.path.exists(p)), None)


@torch.no_grad()
def fit(model, x, H, D):
    """Per layer: (PCA basis [H, D, D], eigenvalues descending; RMS [2, H] of K and V) from one forward."""
    out = model(x, use_cache=True)
    pkv = out.past_key_values
    fits = []
    for i in range(model.config.num_hidden_layers):
        k, v = (pkv.layers[i].keys, pkv.layers[i].values) if hasattr(pkv, "layers") else pkv[i]
        bases, rms = [], []
        for which, t in enumerate((k, v)):  # [B, H, n, D]
            X = t.double().transpose(0, 1).reshape(H, -1, D)
            C = X.transpose(1, 2) @ X / X.shape[1]
            evals, evecs = torch.linalg.eigh(C)  # ascending
            bases.append(evecs.flip(-1).float())
            rms.append((torch.diagonal(C, dim1=1, dim2=2).mean(-1)).sqrt().float())
        fits.append((bases, torch.stack(rms)))
    return fits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tiny-llama-hd64"))
    ap.add_argument("--text", default=None, help="validation text (default: as bench/perplexity.py)")
    ap.add_argument("--train", default=None, help="training text for the fit (never valid.txt)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--train-windows", type=int, default=8)
    ap.add_argument("--variants", default="rot=none,bound=rel,eb=0.1 rot=pca,bound=rel,eb=0.1 rot=pca,bound=abs,eb=0.3")
    args = ap.parse_args()
    import kvcomp.hf as hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = args.text or first_existing(os.path.join(ROOT, "data", "valid.txt"),
                                       os.path.join(ROOT, "..", "shared", "data", "text", "valid.txt"))
    train = args.train or first_existing(os.path.join(ROOT, "data", "train_00.txt"),
                                         os.path.join(ROOT, "..", "shared", "data", "text", "train_00.txt"))
    if text is None or train is None:
        raise SystemExit("pass --text and --train")
    assert os.path.basename(train) != "valid.txt", "never fit on the validation text"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16).cuda().eval()
    hf.enable(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    W = model.config.max_position_embeddings
    L, _, H, D = hf._model_shape(model)
    fits = fit(model, harness.windows_of(tok, train, args.train_windows, W)[0].cuda(), H, D)
    x = harness.windows_of(tok, text, args.windows, W)[0].cuda()
    base = math.exp(harness.nll_of(model, x, None))
    fp16 = L * H * D * 4
    print(f"fp16 ppl {base:.4f}; EMULATED transform study, {args.windows} windows x {W}, "
          f"fit on {args.train_windows} windows of {os.path.basename(train)}")
    for i, (bases, rms) in enumerate(fits):
        print(f"  layer {i}: RMS K {rms[0].tolist()} V {rms[1].tolist()}")
    print("| variant | perplexity | change | est. bytes/token | est. ratio |\n|---|---:|---:|---:|---:|")
    for spec in args.variants.split():
        o = dict(kv.split("=") for kv in spec.split(","))
        eb = float(o.get("eb", 0.1))
        rot, bound = o.get("rot", "none"), o.get("bound", "rel")
        # K's basis rotates q and K (scores unchanged), V's rotates V and the output back.
        basis_of = (lambda i: fits[i][0]) if rot == "pca" else None  # noqa: E731
        abs_of = (lambda i: eb * fits[i][1]) if bound == "abs" else None  # noqa: E731
        cache = tail_study.make_cache(hf, model, "today", lambda i: eb, 1.0, rot == "hadamard", 64, 0,
                                      basis_of=basis_of, abs_eb_of=abs_of)
        ppl = math.exp(harness.nll_of(model, x, cache))
        bpt = tail_study.estimate_bytes_per_token(cache, "today", W, 64, 0)
        print(f"| emu {spec} | {ppl:.4f} | {100 * (ppl / base - 1):+.3f}% | {bpt:.1f} | {fp16 / bpt:.2f}x |",
              flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
