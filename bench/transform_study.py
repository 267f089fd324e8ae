#!/usr/bin/env python3
"""Design study for the quantizer (an EMULATION, not the library): decorrelate K and V with a PCA basis per
(layer, kv head) fitted on training text, and/or bound every group by one absolute error per (layer, kv head,
K|V) instead of eb x the group's range (reverse water-filling: components whose spread is below the bound cost
almost nothing). The library's scheme otherwise (bench/tail_study.py, mode=today: K per channel over 64-token
blocks, V per token, fp16 open tail); bytes estimated as there.

  rot=none|hadamard|pca   basis (pca: eigenvectors of the uncentred second moments of K, V on --train text)
  bound=rel|abs           rel: eb x group range (the library); abs: eb x the RMS of that (layer, head, K|V)
                          on the training text, for every group
  cb=n                    bytes from n code histograms per (layer, kv head, K|V), one per D / n consecutive
                          components (a codebook each, 256 bytes counted), instead of one per (layer, K|V)

    PYTHONPATH=build-py/python python3 bench/transform_study.py --windows 16 \
        --variants "rot=none,bound=rel,eb=0.1 rot=pca,bound=abs,eb=0.3"
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perplexity as harness  # noqa: E402
import study_common as study  # noqa: E402
import tail_study  # noqa: E402


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
    def add_args(ap):
        ap.add_argument("--train", default=None, help="training text for the fit (never valid.txt)")
        ap.add_argument("--train-windows", type=int, default=8)

    args, hf, model, tok, x = study.parse_and_load(
        "rot=none,bound=rel,eb=0.1 rot=pca,bound=rel,eb=0.1 rot=pca,bound=abs,eb=0.3", 16, add_args)
    train = study.text_path(args.train, "train_00.txt")
    assert os.path.basename(train) != "valid.txt", "never fit on the validation text"
    W = x.shape[1]
    L, _, H, D = hf._model_shape(model)
    fits = fit(model, harness.windows_of(tok, train, args.train_windows, W)[0].cuda(), H, D)
    print(f"fit on {args.train_windows} windows of {os.path.basename(train)}")
    for i, (bases, rms) in enumerate(fits):
        print(f"  layer {i}: RMS K {rms[0].tolist()} V {rms[1].tolist()}")

    def make(o):
        eb = float(o.get("eb", 0.1))
        rot, bound = o.get("rot", "none"), o.get("bound", "rel")
        # K's basis rotates q and K (scores unchanged), V's rotates V and the output back.
        basis_of = (lambda i: fits[i][0]) if rot == "pca" else None  # noqa: E731
        abs_of = (lambda i: eb * fits[i][1]) if bound == "abs" else None  # noqa: E731
        return tail_study.make_cache(hf, model, "today", lambda i: eb, 1.0, rot == "hadamard", 64, 0,
                                     basis_of=basis_of, abs_eb_of=abs_of, codebooks=int(o.get("cb", 0)))

    def estimate(cache, o):
        return tail_study.estimate_bytes_per_token(cache, "today", W, 64, 0)

    study.run_variants(hf, model, x, args.variants, make, estimate, "transform study")

if __name__ == "__main__":
    main()
