#!/usr/bin/env python3
"""Design study for the quantizer (an EMULATION, not the library): decorrelate K and V with a PCA basis per
(layer, kv head) fitted on training text, or with bases weighted by what the model reads of them (qw, wo; RESULTS:
both lose to Hadamard), and/or bound every group by one absolute error per (layer, kv head,
K|V) instead of eb x the group's range (reverse water-filling: components whose spread is below the bound cost
almost nothing). The library's scheme otherwise (bench/tail_study.py, mode=today: K per channel over 64-token
blocks, V per token, fp16 open tail); bytes estimated as there.

  rot=none|hadamard|pca   basis (pca: eigenvectors of the uncentred second moments of K, V on --train text)
  bound=rel|abs           rel: eb x group range (the library); abs: eb x the RMS of that (layer, head, K|V)
                          on the training text, for every group
  rk=none|hadamard|pca|qw K's transform (rot= sets rk and rv). qw: q-weighted, k' = k A, q' = q A^-T with
                          A = L U, L L^T = E[q^T q] of the kv head's query heads, U the eigenvectors of
                          L^T E[k^T k] L: the components are decorrelated and an equal error in each is an
                          equal error in the logits (not orthonormal: the bound holds for k', not k)
  rv=none|hadamard|pca|wo V's. wo: the same with sum_j W_j^T W_j of o_proj's columns for the kv head's query
                          heads in place of E[q^T q]: equal error in each component, equal error after o_proj
  bk=, bv=rel|abs|layer|model  K's and V's bound (bound= sets both): rel as above; abs: ek (ev) x the RMS of
                          the transformed components of that (layer, head); layer: of the layer's heads; model:
                          of all layers (one absolute bound in the transform's units)
  ek=, ev=                K's and V's eb (default eb);  reg=r  W + r mean(diag W) I before the Cholesky (1e-3)
  --pairs                 bytes from a Huffman code over pairs of codes instead of the entropy (at least 0.5 bit
                          a value, as the library's pair code; but no 11-bit length cap and no PAIR_ESC for codes
                          >= 15 << k, so a lower bound where codes run high, e.g. absolute bounds on wide
                          components; +0.05 bit a value on top as for the entropy; ignored with cb=n)
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
def fit(hf, model, x, H, D):
    """Per layer, per kv head, float64 from one forward over x with exact attention: second moments of q (the G
    query heads of a kv head, times the softmax scaling), K and V [H, D, D], and of the output projection's columns
    G = sum_j W_j^T W_j over those query heads (W_j: o_proj's D columns of query head j)."""
    L = model.config.num_hidden_layers
    z = lambda: torch.zeros(H, D, D, dtype=torch.float64, device="cuda")  # noqa: E731
    st = [dict(q=z(), k=z(), v=z(), nq=0, nk=0) for _ in range(L)]

    class Rec(hf._Fp16Layer):
        def attend(self, q, k, v, attention_mask, scaling):
            s = st[self.index]
            B, Hq, n, _ = q.shape
            qs = (q.double() * scaling).view(B, H, Hq // H, n, D).transpose(0, 1).reshape(H, -1, D)
            s["q"] += qs.mT @ qs
            s["nq"] += qs.shape[1]
            for name, t in (("k", k), ("v", v)):
                ts = t.double().transpose(0, 1).reshape(H, -1, D)
                s[name] += ts.mT @ ts
            s["nk"] += B * n
            return super().attend(q, k, v, attention_mask, scaling)

    cache = type("RecCache", (hf.Fp16Cache,), {"layer_class": Rec})(model, prefill="fp16")
    model(x, past_key_values=cache, use_cache=True)
    fits = []
    for i, s in enumerate(st):
        W = model.model.layers[i].self_attn.o_proj.weight.double()  # [hidden, Hq D]
        Wj = W.view(W.shape[0], -1, D).transpose(0, 1)  # [Hq, hidden, D]
        Go = (Wj.mT @ Wj).view(H, -1, D, D).sum(1)
        fits.append(dict(q=s["q"] / s["nq"], k=s["k"] / s["nk"], v=s["v"] / s["nk"], o=Go))
    return fits


def eig_desc(C):
    evals, evecs = torch.linalg.eigh(C)
    return evecs.flip(-1)


def weighted_basis(C, Wt, reg):
    """(A, A^-T): x' = x A decorrelates x (second moment C) and makes the weighted error e W e^T of e = e' A^-1
    white (W = L L^T): A = L U, U the eigenvectors of L^T C L (descending)."""
    D = C.shape[-1]
    eye = torch.eye(D, dtype=C.dtype, device=C.device)
    Wr = Wt + reg * torch.diagonal(Wt, dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    Lc = torch.linalg.cholesky(Wr)
    U = eig_desc(Lc.mT @ C @ Lc)
    A = Lc @ U
    return A, torch.linalg.solve_triangular(Lc.mT, U, upper=True)


def transforms(f, rk, rv, reg):
    """(A_k, A_q, A_v, A_out) [H, D, D] float64 for one layer's fit."""
    H, D = f["k"].shape[0], f["k"].shape[-1]
    eye = torch.eye(D, dtype=torch.float64, device="cuda").expand(H, D, D)

    def had():
        if D & (D - 1):
            raise SystemExit(f"hadamard: head_dim {D} is not a power of two")
        return study.hadamard(D, "cuda").double().expand(H, D, D)

    if rk == "none":
        Ak = Aq = eye
    elif rk == "hadamard":
        Ak = Aq = had()
    elif rk == "pca":
        Ak = Aq = eig_desc(f["k"])
    elif rk == "qw":  # q-weighted: logit error q e^T white
        Ak, Aq = weighted_basis(f["k"], f["q"], reg)
    else:
        raise SystemExit(f"rk={rk}?")
    if rv == "none":
        Av = Ao = eye
    elif rv == "hadamard":
        Av = Ao = had()
    elif rv == "pca":
        Av = eig_desc(f["v"])
        Ao = Av.mT
    elif rv == "wo":  # output-projection-weighted: e W_o^T W_o e^T white
        Av, _ = weighted_basis(f["v"], f["o"], reg)
        Ao = torch.linalg.inv(Av)
    else:
        raise SystemExit(f"rv={rv}?")
    return Ak, Aq, Av, Ao


def main():
    def add_args(ap):
        ap.add_argument("--train", default=None, help="training text for the fit (never valid.txt)")
        ap.add_argument("--train-windows", type=int, default=8)
        ap.add_argument("--pairs", action="store_true", help="bytes from a Huffman code over pairs of codes")

    args, hf, model, tok, x = study.parse_and_load("rk=none,bk=rel,eb=0.1 rk=qw,bk=layer,eb=0.1", 16, add_args)
    train = study.text_path(args.train, "train_00.txt")
    assert os.path.basename(train) != "valid.txt", "never fit on the validation text"
    W = x.shape[1]
    L, _, H, D = hf._model_shape(model)
    fits = fit(hf, model, harness.windows_of(tok, train, args.train_windows, W)[0].cuda(), H, D)
    print(f"fit on {args.train_windows} windows of {os.path.basename(train)}")

    def make(o):
        eb = float(o.get("eb", 0.1))
        if "rot" in o:  # the first version's options
            o.setdefault("rk", o["rot"]), o.setdefault("rv", o["rot"])
        if "bound" in o:
            o.setdefault("bk", o["bound"]), o.setdefault("bv", o["bound"])
        rk, rv, reg = o.get("rk", "none"), o.get("rv", "none"), float(o.get("reg", 1e-3))
        eb_k, eb_v = float(o.get("ek", eb)), float(o.get("ev", eb))
        tf = [tuple(a.float() for a in transforms(f, rk, rv, reg)) for f in fits]
        # Mean square of each transformed K|V component, per (layer, head): diag(A^T C A) averaged over D.
        ms = torch.stack([torch.stack([
            torch.diagonal(t[0].double().mT @ f["k"] @ t[0].double(), dim1=1, dim2=2).mean(-1),
            torch.diagonal(t[2].double().mT @ f["v"] @ t[2].double(), dim1=1, dim2=2).mean(-1)])
            for t, f in zip(tf, fits)])  # [L, 2, H]

        def bound(i, which, kind, e):
            if kind == "rel":
                return None
            m = {"abs": ms[i, which], "layer": ms[i, which].mean().expand(H),
                 "model": ms[:, which].mean().expand(H)}[kind]
            return (e * m.sqrt()).float()

        def abs_of(i):
            return [bound(i, 0, o.get("bk", "rel"), eb_k), bound(i, 1, o.get("bv", "rel"), eb_v)]

        return tail_study.make_cache(hf, model, "today", lambda i: (eb_k, eb_v), 1.0, False, 64, 0,
                                     basis_of=lambda i: tf[i], abs_eb_of=abs_of, codebooks=int(o.get("cb", 0)))

    def estimate(cache, o):
        return tail_study.estimate_bytes_per_token(cache, "today", W, 64, 0, pairs=args.pairs)

    study.run_variants(hf, model, x, args.variants, make, estimate, "transform study")


if __name__ == "__main__":
    main()
