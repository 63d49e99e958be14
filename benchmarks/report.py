"""Markdown tables and the plots for one device's results (the dict run.py writes as JSON)."""
from __future__ import annotations

EPOCH_NOTE = ("s/epoch is derived: ceil(60000 / batch) steps x the median step time, "
              "timed over fit() calls of a few dozen steps on Fashion-MNIST-shaped random data")


def _ms(r, scale=1e3, digits=3):
    return (f"{r['median_s'] * scale:.{digits}f} "
            f"({r['min_s'] * scale:.{digits}f}–{r['max_s'] * scale:.{digits}f})")


def _pct(x):
    return "–" if x is None else f"{100 * x:.0f}%"


def _num(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def _check(r):
    if r.get("checked", True):
        return "ok" if r.get("rel_err") is None else f"ok {r['rel_err']:.0e}"
    return f"**FAIL** {r.get('error') or ''}".strip()


def peers_of(rows):
    names = []
    for r in rows:
        for name in r.get("vs", {}):
            if name not in names:
                names.append(name)
    return names


def _find(rows, section, impl="fastmlp", **match):
    for r in rows:
        if r["section"] == section and r["impl"] == impl and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def summary(res) -> list:
    """Key rows as a short Markdown table (the README's): GEMM 1024^3 (4096^3 on a GPU),
    the MLP's B=1024 products, the largest memory-bound sizes, training."""
    rows, ceil = res["rows"], res["ceilings"]
    lines = ["| measurement | fastmlp | peers (same run) | fastmlp vs peer |", "|---|---|---|---|"]

    def add(label, r, unit, key, scale=1.0, fmt="{:.0f}"):
        if r is None:
            return
        spread = f" ({r['median_s'] * 1e3:.3g} ms, {r['min_s'] * 1e3:.3g}–{r['max_s'] * 1e3:.3g})" \
            if key != "ms" else f" ({r['min_s'] * 1e3:.3g}–{r['max_s'] * 1e3:.3g})"
        val = r["median_s"] * 1e3 if key == "ms" else r[key] * scale
        peers = "; ".join(f"{p} " + fmt.format(v["median_s"] * 1e3 if key == "ms" else v[key] * scale)
                          + f" {unit}" for p, v in r.get("vs", {}).items())
        ratios = "; ".join(f"{_pct(v['ratio'])} of {p}" for p, v in r.get("vs", {}).items())
        extra = f", {r['pct_of_roof']:.0f}% of {'copy BW' if key == 'gbps' else 'roof'}" \
            if r.get("pct_of_roof") is not None else ""
        lines.append(f"| {label} | {fmt.format(val)} {unit}{spread}{extra} | {peers or '–'} | {ratios or '–'} |")

    square = 1024 if res["meta"]["device_kind"] == "cpu" else 4096
    add(f"GEMM {square}^3", _find(rows, "gemm", problem=f"square {square}"), "GFLOP/s", "gflops")
    for variant in ("fwd X@W", "dX=dY@W^T", "dW=X^T@dY"):
        add(f"GEMM 784->128 B=1024 {variant}", _find(rows, "gemm", problem="784->128 B=1024", variant=variant),
            "GFLOP/s", "gflops")
    mem = [r for r in rows if r["section"] == "memory" and r["impl"] == "fastmlp"]
    for op in dict.fromkeys(r["op"] for r in mem):
        big = max((r for r in mem if r["op"] == op), key=lambda r: r["bytes"])
        add(f"{op} {big['shape']}", big, "GB/s", "gbps", fmt="{:.1f}")
    for r in rows:
        if r["section"] == "denormal" and r["impl"] == "fastmlp":
            v = next(iter(r["vs"].values()))
            lines.append(f"| {r['op']} {r['shape']}, {r['variant']} | {r['median_s'] * 1e3:.3g} ms "
                         f"({r['min_s'] * 1e3:.3g}–{r['max_s'] * 1e3:.3g}) | normal data {v['median_s'] * 1e3:.3g} ms | "
                         f"denormal costs {1 / v['ratio']:.2f}x |")
    for r in rows:
        if r["section"] == "training" and r["impl"] == "fastmlp":
            add(f"train step B={r['batch']} ({r['epoch_s']:.2f} s/epoch)", r, "ms", "ms", fmt="{:.3g}")
    for r in rows:
        if r["section"] == "epoch" and r["impl"] == "fastmlp":
            peers = "; ".join(f"{p} {v['median_s']:.3g} s ({v['min_s']:.3g}–{v['max_s']:.3g}), "
                              f"test acc {_peer_row(rows, r, p)['test_accuracy']:.4f}"
                              for p, v in r.get("vs", {}).items())
            ratios = "; ".join(_times(v["ratio"], p) for p, v in r.get("vs", {}).items())
            if r.get("target"):
                ratios += f"; target {r['target']}: {_met(r)}"
            lines.append(f"| {_epoch_label(r)} | {r['median_s']:.3g} s "
                         f"({r['min_s']:.3g}–{r['max_s']:.3g}), test acc {r['test_accuracy']:.4f} | "
                         f"{peers or '–'} | {ratios or '–'} |")
    if ceil.get("copy_gbps"):
        lines.append(f"| copy bandwidth (measured) | {ceil['copy_gbps']:.1f} GB/s | | |")
    return lines


def _peer_row(rows, ours, impl, **match):
    """The row of peer impl measured with fastmlp's row ours (same section, op and shape,
    and the fields of match)."""
    return next(r for r in rows if r["impl"] == impl and r["section"] == ours["section"]
                and r["op"] == ours["op"] and r["shape"] == ours["shape"]
                and all(r.get(k) == v for k, v in match.items()))


def _times(ratio, peer):
    return f"{ratio:.1f}x faster than {peer}" if ratio >= 1 else f"{_pct(ratio)} of {peer}"


def _met(r):
    met = "met" if r.get("target_met") else "not met"
    if r.get("target_stretch_met") is not None:
        met += ", stretch " + ("met" if r["target_stretch_met"] else "not met")
    return met


def _epoch_label(r):
    if r["op"] == "time_to_accuracy":
        return f"Fashion-MNIST {r['epochs']} epochs B={r['batch']} from host arrays (time to accuracy)"
    return f"Fashion-MNIST epoch, B={r.get('batch', 32)}, Adam"


def markdown(res) -> str:
    meta, ceil, rows = res["meta"], res["ceilings"], res["rows"]
    env = meta["env"]
    out = [f"# fastmlp benchmarks: {meta['device']}", ""]
    out.append(f"commit `{meta['commit']}`, {meta['date']}, {'--quick' if meta['quick'] else 'full'} run "
               f"({meta['wall_s']:.0f} s), " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
               + ".")
    if meta["device_kind"] == "cpu":
        out.append(f"Threads: fastmlp (own pool) {env.get('fastmlp_threads')}, NumPy's BLAS "
                   f"({env.get('blas')} {env.get('blas_version')}, kernel "
                   f"{env.get('blas_architecture') or env.get('blas_core')}) "
                   f"{env.get('blas_threads')}, PyTorch {meta.get('torch_threads')} "
                   f"({meta.get('torch_cpu')}); unset for the peers by run.py: "
                   f"{meta.get('unset_for_peers') or 'nothing (neither was set)'}; "
                   f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}, "
                   f"OPENBLAS_NUM_THREADS={env.get('OPENBLAS_NUM_THREADS')}, "
                   f"OPENBLAS_THREAD_TIMEOUT={env.get('OPENBLAS_THREAD_TIMEOUT')} (set by run.py: "
                   "idle OpenBLAS workers sleep at once instead of spinning and stalling the other "
                   f"libraries' threads), OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY')} (PyTorch's "
                   "OpenMP, left at its default; fastmlp uses its own thread pool). "
                   f"The machine is shared (load average {meta.get('load_start')} at the start, "
                   f"{meta.get('load_end')} at the end; 1 and 5 min): "
                   "compare ratios within this run, not absolute numbers across runs.")
        out.append("")
        out.append("Method: time.perf_counter around single calls; warm-up, then blocks of calls per "
                   "implementation over 3 rounds; median (min–max) of all calls. Inputs stay in cache "
                   "between calls where they fit.")
    else:
        out.append(f"GPU: compute capability {env.get('compute_capability')}, {env.get('sms')} SMs, "
                   f"L2 {env.get('l2_bytes', 0) >> 20} MiB, CUDA runtime {env.get('cuda_runtime')}, "
                   f"driver {env.get('cuda_driver')}; TF32 off everywhere.")
        out.append("")
        out.append("Method: CUDA events around single calls, the L2 flushed (256 MiB written) before "
                   "each; warm-up, then blocks of calls per implementation over 3 rounds; median "
                   "(min–max). Op times include fastmlp's Python-side argument checks when they are "
                   "longer than the flush.")
    out.append("Every fastmlp output was checked against a reference before it was timed "
               "(`check`: relative max-norm error). `vs X` = X's time / fastmlp's time "
               "(fastmlp's rate as a % of X's; above 100%: fastmlp is faster).")
    out += ["", "## Summary", ""] + summary(res)
    out += ["", "## Ceilings", "", "| ceiling | value | how |", "|---|---|---|"]
    copies = ", ".join(f"{k} {v:.1f}" for k, v in ceil.get("copy_all", {}).items())
    if "copy_gbps" in ceil:
        out.append(f"| copy bandwidth | {ceil['copy_gbps']:.1f} GB/s | measured: {ceil['copy_bytes'] // 2 >> 20} "
                   f"MiB copies, read + write counted ({copies} GB/s) |")
    if ceil.get("peak_gflops"):
        out.append(f"| FP32 roof | {ceil['peak_gflops']:.0f} GFLOP/s | {ceil['peak_how']} |")
    if ceil.get("matmul_gflops"):
        out.append(f"| best measured matmul | {ceil['matmul_gflops']:.0f} GFLOP/s | {ceil['matmul_how']} |")

    gemm = [r for r in rows if r["section"] == "gemm" and r["impl"] == "fastmlp"]
    if gemm:
        peers = peers_of(gemm)
        out += ["", "## GEMM (FP32)", "",
                "| problem | op | m x n x k | fastmlp ms (min–max) | GFLOP/s | % of roof | " +
                " | ".join(f"{p} GFLOP/s | vs {p}" for p in peers) + " | check |",
                "|---|---|---|---|---|---|" + "---|---|" * len(peers) + "---|"]
        for r in gemm:
            cells = [r["problem"], r["variant"], r["shape"], _ms(r), _num(r["gflops"], 0),
                     _num(r.get("pct_of_roof"), 0) + "%"]
            for p in peers:
                v = r["vs"].get(p)
                cells += [_num(v and v["gflops"], 0), _pct(v and v["ratio"])]
            out.append("| " + " | ".join(cells + [_check(r)]) + " |")

    mem = [r for r in rows if r["section"] == "memory" and r["impl"] == "fastmlp"]
    if mem:
        peers = peers_of(mem)
        out += ["", "## Memory-bound kernels", "",
                f"Bytes moved: each input read once, each output written once. Copy bandwidth: "
                f"{ceil.get('copy_gbps', float('nan')):.1f} GB/s. Above 100% of it: the data sat in cache.",
                "", "| op | shape | MB moved | fastmlp µs (min–max) | GB/s | % of copy | " +
                " | ".join(f"{p} GB/s | vs {p}" for p in peers) + " | check |",
                "|---|---|---|---|---|---|" + "---|---|" * len(peers) + "---|"]
        for r in mem:
            op = r["op"] + (f" ({r['variant']})" if r["variant"] else "")
            cells = [op, r["shape"], f"{r['bytes'] / 1e6:.3g}", _ms(r, 1e6, 1), _num(r["gbps"]),
                     _num(r.get("pct_of_roof"), 0) + "%"]
            for p in peers:
                v = r["vs"].get(p)
                cells += [_num(v and v["gbps"]), _pct(v and v["ratio"])]
            out.append("| " + " | ".join(cells + [_check(r)]) + " |")

    lay = [r for r in rows if r["section"] == "layers" and r["impl"] == "fastmlp" and not r.get("fused")]
    if lay:
        peers = peers_of(lay)
        out += ["", "## Layers: activations, dropout, normalisation (issue 15)", "",
                f"Bytes moved: the kernel's minimum traffic (column `traffic`: each input read once, "
                f"each output written once). Copy bandwidth: {ceil.get('copy_gbps', float('nan')):.1f} GB/s. "
                "Each peer's row is its fastest candidate in this run (`peer variant`; PyTorch's "
                "allocating and preallocated-output overloads where both exist).", "",
                "| op | shape | MB moved | fastmlp µs (min–max) | GB/s | % of copy | " +
                " | ".join(f"{p} µs (min–max) | {p} GB/s | vs {p} | {p} variant" for p in peers) +
                " | traffic | check |",
                "|---|---|---|---|---|---|" + "---|---|---|---|" * len(peers) + "---|---|"]
        for r in lay:
            op = r["op"] + (f" ({r['variant']})" if r["variant"] else "")
            cells = [op, r["shape"], f"{r['bytes'] / 1e6:.3g}", _ms(r, 1e6, 1), _num(r["gbps"]),
                     _num(r.get("pct_of_roof"), 0) + "%"]
            for p in peers:
                v = r["vs"].get(p)
                pr = _peer_row(rows, r, p, variant=r["variant"]) if v else None
                cells += [_ms(pr, 1e6, 1) if pr else "–", _num(v and v["gbps"]), _pct(v and v["ratio"]),
                          (pr or {}).get("peer_variant") or "–"]
            out.append("| " + " | ".join(cells + [r.get("traffic", ""), _check(r)]) + " |")
    fused = [r for r in rows if r["section"] == "layers" and r["impl"] == "fastmlp" and r.get("fused")]
    if fused:
        peers = peers_of(fused)
        out += ["", "## Fused Dense + activation vs unfused (issue 15)", "",
                "fastmlp: one call with the activation in the GEMM epilogue; `fastmlp unfused`: the "
                "plain GEMM call, then the activation kernel in place; PyTorch: addmm / mm (F.linear's "
                "kernels), then the activation's out= overload in place. `vs X` = X's time / the fused "
                "time.", "",
                "| problem | op | activation | m x n x k | fused ms (min–max) | GFLOP/s | " +
                " | ".join(f"{p} ms (min–max) | vs {p}" for p in peers) + " | check |",
                "|---|---|---|---|---|---|" + "---|---|" * len(peers) + "---|"]
        for r in fused:
            cells = [r.get("problem", ""), r["op"], r["variant"], r["shape"], _ms(r), _num(r["gflops"], 0)]
            for p in peers:
                v = r["vs"].get(p)
                pr = _peer_row(rows, r, p, variant=r["variant"]) if v else None
                cells += [_ms(pr) if pr else "–", _pct(v and v["ratio"])]
            out.append("| " + " | ".join(cells + [_check(r)]) + " |")

    kern = [r for r in rows if r["section"] == "losses" and r["impl"] == "fastmlp" and r["op"] != "fit_epoch"]
    if kern:
        out += ["", "## Losses, metrics, ROC AUC, optimizers with transforms (issue 16)", "",
                "One call each: `loss_forward_backward` (loss and dpred), `metric_sums` (the sums read "
                "back), `roc_auc`, one optimizer step. GB/s: the minimum traffic (inputs read once, "
                "outputs written once). Each peer's row is its fastest candidate in this run (`peer "
                "variant`: the aten forward + aten backward kernel without autograd, or autograd; "
                "torch.optim foreach False / True). `vs X` = X's time / fastmlp's (above 100%: "
                "fastmlp is faster).", "",
                "| op | variant | shape | fastmlp µs (min–max) | GB/s | peer | peer µs (min–max) | vs peer "
                "| peer variant | check |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in kern:
            for p, v in (r.get("vs") or {"–": None}).items():
                pr = _peer_row(rows, r, p, variant=r["variant"]) if v else None
                out.append("| " + " | ".join([
                    r["op"], r["variant"], r["shape"], _ms(r, 1e6, 1), _num(r["gbps"]), p,
                    _ms(pr, 1e6, 1) if pr else "–", _pct(v and v["ratio"]),
                    (pr or {}).get("peer_variant") or "–", _check(r) + ("" if pr is None or pr.get("checked", True)
                                                                       else f"; peer {_check(pr)}")]) + " |")
    fits = [r for r in rows if r["section"] == "losses" and r["impl"] == "fastmlp" and r["op"] == "fit_epoch"]
    if fits:
        peers = peers_of(fits)
        out += ["", f"## Training options: one fit epoch, {fits[0]['shape']} (issue 16)", "",
                "784-128-10 relu, Adam 1e-3, synthetic data on the device, one epoch timed end to end "
                "(fit(verbose=0) vs a PyTorch eager loop with the same option), the implementations "
                "alternating. `overhead` = the option's epoch time / plain's, per library; `vs X` = "
                "X's time / fastmlp's.", "",
                "| option | fastmlp s (min–max) | overhead | " +
                " | ".join(f"{p} s (min–max) | {p} overhead | vs {p}" for p in peers) + " | check |",
                "|---|---|---|" + "---|---|---|" * len(peers) + "---|"]
        for r in fits:
            cells = [r["variant"], _ms(r, 1, 3), _num(r.get("overhead_vs_plain"), 2) + "x"]
            for p in peers:
                v = r["vs"].get(p)
                pr = _peer_row(rows, r, p, variant=r["variant"]) if v else None
                cells += [_ms(pr, 1, 3) if pr else "–",
                          _num(pr and pr.get("overhead_vs_plain"), 2) + "x", _pct(v and v["ratio"])]
            out.append("| " + " | ".join(cells + [_check(r)]) + " |")

    dp = [r for r in rows if r["section"] == "privacy" and r["impl"] == "fastmlp"]
    if dp:
        out += ["", "## Privacy: the DP-SGD step against the plain step (issue 17)", "",
                "784-128-10 relu on synthetic data on the device, one epoch of fit() timed per "
                "step; DP = fm.privacy.DPAdam (l2_norm_clip 1, noise_multiplier 1.1: per-example "
                "norms, clip factors inside the weight-gradient GEMM, noise in the Adam kernel) "
                "vs plain Adam, alternating in the same run. `overhead` = the DP step's time / "
                "the plain step's, per library (target for fastmlp: <= 1.3x). Opacus: its DP Adam "
                "on the PyTorch model (per-sample gradient hooks), fixed batches.", "",
                "| batch | fastmlp DP ms (min–max) | fastmlp plain ms | overhead | PyTorch plain ms "
                "| Opacus DP ms | Opacus overhead | Opacus DP / fastmlp DP | check |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in dp:
            vs = r.get("vs") or {}
            plain = _peer_row(rows, r, "fastmlp Adam") if "fastmlp Adam" in vs else None
            pt = _peer_row(rows, r, "PyTorch Adam") if "PyTorch Adam" in vs else None
            op = _peer_row(rows, r, "Opacus") if "Opacus" in vs else None
            out.append("| " + " | ".join([
                str(r["batch"]), _ms(r), _ms(plain) if plain else "–",
                _num(r.get("dp_overhead"), 2) + "x", _ms(pt) if pt else "–",
                _ms(op) if op else "–", _num(r.get("opacus_overhead"), 2) + "x"
                if r.get("opacus_overhead") else "–",
                _num(vs["Opacus"]["ratio"], 2) + "x" if "Opacus" in vs else "–",
                _check(r)]) + " |")

    attr = [r for r in rows if r["section"] == "robustness" and r["impl"] == "fastmlp"
            and r["op"] != "adv_train"]
    adv = [r for r in rows if r["section"] == "robustness" and r["impl"] == "fastmlp"
           and r["op"] == "adv_train"]
    if attr or adv:
        out += ["", "## Robustness: attributions and adversarial training (issue 18)", "",
                "Attributions: fm.explain on the 784-128-10 relu softmax model against Captum on "
                "a torch.nn.Sequential with the same weights, random [0, 1) images, random target "
                "classes; one call over all the images, alternating, timed per image. Captum's "
                "IG runs with internal_batch_size = 20 x 50 points (about fastmlp's 1024 per "
                "pass) and with its default (all points at once); the faster is the peer (`Captum "
                "variant`). Both outputs are checked: fastmlp against fastmlp.reference (float64), "
                "Captum against fastmlp (max abs difference / max abs value < 1e-3). "
                "Adversarial training: one fit() epoch with fm.adversarial.PGD (eps 0.1, alpha "
                "0.025, 10 steps, random start) against one plain epoch (Adam 1e-3, random "
                "images and labels), alternating, and the same two as PyTorch eager loops "
                "(torchattacks' PGD update, autograd.grad with respect to the rows). `overhead` = "
                "the adversarial epoch / the plain epoch per library (ideal ~11x: ten attack "
                "passes and the training step); `vs X` = X's time / fastmlp's.", ""]
    if attr:
        out += ["| op | problem | fastmlp images/s | fastmlp µs/image (min–max) | Captum images/s "
                "| Captum µs/image (min–max) | Captum variant | vs Captum | check |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in attr:
            cap = _peer_row(rows, r, "Captum") if "Captum" in (r.get("vs") or {}) else None
            out.append("| " + " | ".join([
                f"{r['op']} ({r['variant']})", r["shape"], f"{r['images_per_s']:.0f}",
                _ms(r, 1e6, 1), f"{cap['images_per_s']:.0f}" if cap else "–",
                _ms(cap, 1e6, 1) if cap else "–", cap["peer_variant"] if cap else "–",
                _num(r["vs"]["Captum"]["ratio"], 2) + "x" if cap else "–",
                _check(r) + ("" if cap is None or cap.get("checked", True)
                             else f"; Captum {_check(cap)}")]) + " |")
    if adv:
        if attr:
            out.append("")
        out += ["| problem | fastmlp PGD-10 s/epoch (min–max) | fastmlp plain s/epoch | overhead "
                "| PyTorch PGD-10 s/epoch (min–max) | PyTorch plain s/epoch | PyTorch overhead "
                "| vs PyTorch PGD-10 | check |", "|---|---|---|---|---|---|---|---|---|"]
        for r in adv:
            vs = r.get("vs") or {}
            plain = _peer_row(rows, r, "fastmlp plain") if "fastmlp plain" in vs else None
            tadv = _peer_row(rows, r, "PyTorch PGD-10") if "PyTorch PGD-10" in vs else None
            tplain = _peer_row(rows, r, "PyTorch plain") if "PyTorch plain" in vs else None
            out.append("| " + " | ".join([
                r["shape"], _ms(r, 1, 3), _ms(plain, 1, 3) if plain else "–",
                _num(r.get("adv_overhead"), 2) + "x", _ms(tadv, 1, 3) if tadv else "–",
                _ms(tplain, 1, 3) if tplain else "–",
                _num(r.get("torch_adv_overhead"), 2) + "x" if r.get("torch_adv_overhead") else "–",
                _num(vs["PyTorch PGD-10"]["ratio"], 2) + "x" if tadv else "–",
                _check(r)]) + " |")

    den = [r for r in rows if r["section"] == "denormal" and "vs" in r]
    if den:
        out += ["", "## Denormal data", "",
                "The same call on denormal and on normal data, alternated in one run; `cost` = "
                "denormal time / normal time (1.00: free). fastmlp flushes denormals to zero inside "
                "its CPU kernels by default (`fm.set_flush_denormal`); NumPy is IEEE.", "",
                "| impl | op | shape | data and mode | denormal ms (min–max) | normal ms (min–max) | cost |",
                "|---|---|---|---|---|---|---|"]
        for r in den:
            v = next(iter(r["vs"].values()))
            out.append(f"| {r['impl']} | {r['op']} | {r['shape']} | {r['variant']} | {_ms(r)} | "
                       f"{v['median_s'] * 1e3:.3f} ({v['min_s'] * 1e3:.3f}–{v['max_s'] * 1e3:.3f}) | "
                       f"{1 / v['ratio']:.2f}x |")

    train = [r for r in rows if r["section"] == "training" and r["impl"] == "fastmlp"]
    out += ["", "## Training: 784-128-10, Adam", ""]
    if train:
        peers = peers_of(train)
        out += [EPOCH_NOTE + f"; {train[0].get('data')}.", "",
                "| batch | fastmlp ms/step (min–max) | s/epoch | " +
                " | ".join(f"{p} ms/step (min–max) | {p} s/epoch | vs {p}" for p in peers) + " | check |",
                "|---|---|---|" + "---|---|---|" * len(peers) + "---|"]
        for r in train:
            cells = [str(r["batch"]), _ms(r), f"{r['epoch_s']:.2f}"]
            for p in peers:
                v = r["vs"].get(p)
                peer_row = next(x for x in rows if x["section"] == "training" and x["impl"] == p
                                and x["batch"] == r["batch"])
                cells += [_ms(peer_row), f"{peer_row['epoch_s']:.2f}", _pct(v["ratio"])]
            out.append("| " + " | ".join(cells + [_check(r)]) + " |")
    else:
        out.append(f"Not measured: {res['skipped'].get('training', 'the section did not run')}.")
    epoch = [r for r in rows if r["section"] == "epoch"]
    if epoch:
        out += ["", "## Fashion-MNIST: one epoch per batch, and time to accuracy (784-128-10, Adam 1e-3)", "",
                "One epoch: 60,000 training images with the data already on the device, fit() / the "
                "PyTorch loops timed end to end. Time to accuracy: the whole job from host NumPy arrays "
                "(upload, build, train, test accuracy). Every run starts from fresh weights, the "
                "implementations in turn; test accuracy on the 10,000 test images; a run below its "
                "accuracy floor is a FAIL.", "",
                "| run | impl | seconds median (min–max) | runs | test accuracy (median; all) | "
                "fastmlp vs this | notes | check |", "|---|---|---|---|---|---|---|---|"]
        variants, targets = {}, []
        for ours in (r for r in epoch if r["impl"] == "fastmlp"):
            label = _epoch_label(ours).replace("Fashion-MNIST ", "")
            for r in [ours] + [_peer_row(rows, ours, p) for p in ours.get("vs", {})]:
                variants.setdefault(r["impl"], set()).add(r["variant"])
                ratio = "" if r is ours else _times(ours["vs"][r["impl"]]["ratio"], "this")
                notes = [f"engine {ours.get('history_params_engine')} "
                         f"({ours.get('history_params_engine_reason')})"] if r is ours else []
                if r.get("capture_s") is not None:
                    notes.append(f"warm-up + capture {r['capture_s']:.2f} s, outside the time")
                accs = ", ".join(f"{a:.4f}" for a in r.get("test_accuracy_all", []))
                out.append(f"| {label} | {r['impl']} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) | "
                           f"{r['repeats']} | {r['test_accuracy']:.4f}; {accs} | {ratio} | "
                           f"{'; '.join(notes)} | {_check(r)} |")
            if ours.get("target"):
                targets.append(f"- {label}: {ours['target']}: **{_met(ours)}**")
        out += [""] + [f"- {impl}: " + "; ".join(sorted(v)) for impl, v in variants.items()]
        if targets:
            out += ["", "Targets of the training-engine issue (recorded, not asserted):", ""] + targets
    for name, why in res["skipped"].items():
        if name != "training":
            out += ["", f"Section {name} skipped: {why}."]
    if meta.get("torch_note"):
        out += ["", f"PyTorch rows missing: {meta['torch_note']}."]
    if res["failures"]:
        out += ["", "## FAILURES", ""] + [f"- {f}" for f in res["failures"]]
    return "\n".join(out) + "\n"


def plots(res, path):
    """One PNG, three panels: GEMM GFLOP/s vs size, roofline, training step time vs batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, ceil, meta = res["rows"], res["ceilings"], res["meta"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    fig.suptitle(f"fastmlp on {meta['device']} (commit {meta['commit']}, {meta['date'][:10]})")

    # 1. GEMM rate vs size, every implementation
    squares = [r for r in rows if r["section"] == "gemm" and r.get("problem", "").startswith("square")]
    for impl in dict.fromkeys(r["impl"] for r in squares):
        pts = sorted((int(r["shape"].split("x")[0]), r["gflops"]) for r in squares if r["impl"] == impl)
        ax1.plot(*zip(*pts), marker="o", label=impl, lw=2.5 if impl == "fastmlp" else 1.5)
    if ceil.get("peak_gflops"):
        ax1.axhline(ceil["peak_gflops"], ls="--", c="gray", label="FP32 roof (derived)")
    ax1.set(xscale="log", xlabel="m = n = k", ylabel="GFLOP/s", title="FP32 GEMM, square")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    # 2. roofline: every fastmlp kernel row
    ours = [r for r in rows if r["impl"] == "fastmlp" and r["section"] in ("gemm", "memory")
            and r.get("intensity") and r.get("gflops")]
    if ours:
        ai = [r["intensity"] for r in ours]
        xs = [min(ai) / 2, max(ai) * 2]
        grid = [xs[0] * (xs[1] / xs[0]) ** (i / 50) for i in range(51)]
        top = ceil.get("matmul_gflops") or max(r["gflops"] for r in ours)
        if ceil.get("copy_gbps"):
            ax2.plot(grid, [min(ceil["copy_gbps"] * x, top) for x in grid], c="k",
                     label=f"measured copy {ceil['copy_gbps']:.0f} GB/s / matmul {top:.0f} GFLOP/s")
        if ceil.get("peak_gflops"):
            ax2.axhline(ceil["peak_gflops"], ls="--", c="gray", label="FP32 roof (derived)")
        markers = "osD^v<>ph*"
        for i, op in enumerate(dict.fromkeys(r["op"] for r in ours)):
            pts = [(r["intensity"], r["gflops"]) for r in ours if r["op"] == op]
            ax2.scatter(*zip(*pts), marker=markers[i % len(markers)], label=op, s=22, alpha=0.8)
        ax2.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte moved)",
                ylabel="achieved GFLOP/s", title="Roofline: fastmlp kernels, all sizes")
        ax2.legend(fontsize=7, loc="lower right")
        ax2.grid(alpha=0.3, which="both")

    # 3. training step time vs batch
    train = [r for r in rows if r["section"] == "training"]
    if train:
        for impl in dict.fromkeys(r["impl"] for r in train):
            pts = sorted((r["batch"], r["median_s"] * 1e3, r["min_s"] * 1e3, r["max_s"] * 1e3)
                         for r in train if r["impl"] == impl)
            b, med, lo, hi = zip(*pts)
            ax3.errorbar(b, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]],
                         marker="o", capsize=3, label=impl)
        ax3.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per step (median, min–max)",
                title="Training 784-128-10 + Adam")
        ax3.set_xscale("log", base=2)
        ax3.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax3.legend(fontsize=8)
        ax3.grid(alpha=0.3, which="both")
    else:
        why = res["skipped"].get("training", "not run")
        ax3.text(0.5, 0.5, "training not measured:\n" + why, ha="center", va="center", wrap=True,
                 transform=ax3.transAxes)
        ax3.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
