"""The ``analyse`` phase of tools/label_issue_bench.py: scores every method against
the known flip mask and writes the tables, the precision-recall plot and a JSON."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from dps_fast import label_issues as L

METHODS = {
    "a": "(a) DPS posterior, one run",
    "b": "(b) cleanlab, in-sample CE probabilities",
    "c": "(c) cleanlab, 5-fold out-of-sample CE",
    "d": "(d) cleanlab on the DPS posterior means (ranks as (e): hidden under it)",
    "e": "(e) cleanlab on the DPS evidence (prior removed)",
}
METRICS = ("precision", "recall", "f1", "auroc", "precision_at_k", "average_precision")
RECALL_GRID = np.linspace(0, 1, 101)


def cleanlab_method(labels: torch.Tensor, probs: torch.Tensor) -> tuple:
    """cleanlab 2.9 defaults: find_label_issues (prune_by_noise_rate) for the selection,
    1 - self-confidence label quality for the ranking. Returns (scores, mask, seconds)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p = probs.double()
    p = (p / p.sum(1, keepdim=True)).numpy()
    y = labels.numpy()
    t0 = time.perf_counter()
    mask = find_label_issues(y, p)
    quality = get_label_quality_scores(y, p)
    return torch.as_tensor(1 - quality), torch.as_tensor(mask), time.perf_counter() - t0


def pr_curve(scores: torch.Tensor, is_error: torch.Tensor) -> np.ndarray:
    """Interpolated precision (the best precision at recall >= r) on RECALL_GRID."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, _ = precision_recall_curve(is_error.numpy(), scores.double().numpy())
    best = np.maximum.accumulate(prec)  # rec decreases along the arrays: the max over recall >= r
    return np.interp(RECALL_GRID, rec[::-1], best[::-1])


def evaluate_seed(B, args, data, setting: str, seed: int) -> dict:
    """Every method's detection metrics (+ cost) for one setting and seed."""
    labels = B.noisy_labels(data, setting, seed)
    is_error = labels != data["clean"]
    dps, ce = B.load_job(args, setting, seed, "dps"), B.load_job(args, setting, seed, "ce")
    folds = [B.load_job(args, setting, seed, f"fold{k}") for k in range(B.FOLDS)]
    oos = torch.zeros(len(labels), data["C"])
    for f in folds:
        oos[f["held"]] = f["held_probs"]
    out = {"realised_rate": float(is_error.float().mean()),
           "memorised": float((ce["train_probs"].argmax(1) == labels)[is_error].float().mean())}
    prior = dps["dps"]
    t0 = time.perf_counter()
    issues = L.find_label_issues(dps["alpha"], labels, prior_params=prior)
    s, _ = L.label_issue_scores(dps["alpha"], labels)
    detect_s = time.perf_counter() - t0
    out["a"] = {**L.detection_metrics(s, is_error, issues.indices), "trainings": 1,
                "seconds": dps["seconds"] + detect_s, "detect_s": detect_s, "pr": pr_curve(s, is_error)}
    out["a_scores"] = {sc: L.detection_metrics(L.label_issue_scores(dps["alpha"], labels, sc)[0], is_error,
                                               L.find_label_issues(dps["alpha"], labels, score=sc,
                                                                   prior_params=prior).indices)
                       for sc in L.SCORES}
    out["rates"] = {m: L.estimate_noise_rate(dps["alpha"], labels, m, prior_params=prior) for m in L.RATE_ESTIMATES}
    t = dps["alpha"] / dps["alpha"].sum(1, keepdim=True)
    evid = L.evidence_rows(dps["alpha"], labels, **prior)
    sources = {"b": (ce["train_probs"], 1, ce["seconds"]), "c": (oos, B.FOLDS, sum(f["seconds"] for f in folds)),
               "d": (t, 1, dps["seconds"]), "e": (evid / evid.sum(1, keepdim=True), 1, dps["seconds"])}
    for key, (probs, trainings, secs) in sources.items():
        sc, mask, cl_s = cleanlab_method(labels, probs)
        out[key] = {**L.detection_metrics(sc, is_error, mask), "trainings": trainings, "seconds": secs + cl_s,
                    "detect_s": cl_s, "pr": pr_curve(sc, is_error)}
    for job in B.DERIVED_JOBS:
        path = os.path.join(B.run_dir(args, setting, seed), f"{job}.pt")
        if os.path.exists(path):
            out[job] = torch.load(path, weights_only=False)
    out["dps_test"], out["ce_test"] = dps["test"], ce["test"]
    return out


def mean_std(values, fmt: str = ".3f") -> str:
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():{fmt}} ± {v.std(ddof=1) if len(v) > 1 else 0.0:{fmt}}"


def pct(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def detection_table(res: dict, settings: list) -> str:
    lines = ["| noise | method | trainings | wall time (s) | precision | recall | F1 | AUROC | precision@k | AP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for st in settings:
        for key, name in METHODS.items():
            rows = [r[key] for r in res[st]]
            cells = [str(rows[0]["trainings"]), f"{np.mean([r['seconds'] for r in rows]):.0f}"]
            cells += [mean_std([r[m] for r in rows]) for m in METRICS]
            lines.append(f"| {st} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_table(res: dict, settings: list) -> str:
    lines = ["| noise | DPS score | AUROC | AP | precision@k | precision | recall | F1 |", "|---|---|---|---|---|---|---|---|"]
    for st in settings:
        for sc in L.SCORES:
            rows = [r["a_scores"][sc] for r in res[st]]
            cells = [mean_std([r[m] for r in rows]) for m in ("auroc", "average_precision", "precision_at_k",
                                                              "precision", "recall", "f1")]
            lines.append(f"| {st} | `{sc}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rate_table(res: dict, settings: list) -> str:
    lines = ["| noise | realised wrong labels | estimate `argmax` | estimate `expected` | cleanlab (c) flags | "
             "noisy labels CE memorised |", "|---|---|---|---|---|---|"]
    for st in settings:
        rs = res[st]
        n = [r["c"]["num_selected"] / r["num_samples"] for r in rs]
        lines.append(f"| {st} | {mean_std([r['realised_rate'] for r in rs])} | "
                     f"{mean_std([r['rates']['argmax'] for r in rs])} | {mean_std([r['rates']['expected'] for r in rs])} | "
                     f"{mean_std(n)} | {mean_std([r['memorised'] for r in rs])} |")
    return "\n".join(lines)


def demo_tables(res: dict, settings: list) -> str:
    soft = ["| noise | model | test acc % | ECE % (15 bins) |", "|---|---|---|---|"]
    clean = ["| noise | training data (cross-entropy) | issues flagged | wrong labels left % | test acc % |",
             "|---|---|---|---|---|"]
    for st in settings:
        rs = [r for r in res[st] if all(j in r for j in ("soft", "clean-remove", "clean-relabel"))]
        if not rs:
            continue
        for name, get in (("hard (noisy) labels", lambda r: r["ce_test"]), ("DPS teacher", lambda r: r["dps_test"]),
                          ("exported DPS soft labels (float16)", lambda r: r["soft"]["test"])):
            soft.append(f"| {st} | {name} | {pct([get(r)['accuracy'] for r in rs])} | "
                        f"{mean_std([get(r)['ece_pct'] for r in rs], '.2f')} |")
        clean.append(f"| {st} | noisy labels | 0 | {pct([r['realised_rate'] for r in rs])} | "
                     f"{pct([r['ce_test']['accuracy'] for r in rs])} |")
        for job, name in (("clean-remove", "flagged issues removed"), ("clean-relabel", "flagged issues relabelled")):
            clean.append(f"| {st} | {name} | {mean_std([r[job]['flagged'] for r in rs], '.0f')} | "
                         f"{pct([r[job]['labels_wrong_after'] for r in rs])} | "
                         f"{pct([r[job]['test']['accuracy'] for r in rs])} |")
    return "\n".join(soft) + "\n\n" + "\n".join(clean)


def plot(res: dict, settings: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.2), squeeze=False)
    for ax, st in zip(axes[0], settings):
        for i, (key, name) in enumerate(METHODS.items()):
            curve = np.mean([r[key]["pr"] for r in res[st]], 0)
            line, = ax.plot(RECALL_GRID, curve, label=name, lw=1.6, ls="-" if key in "ac" else "--")
            ax.plot(np.mean([r[key]["recall"] for r in res[st]]), np.mean([r[key]["precision"] for r in res[st]]),
                    "o", color=line.get_color(), ms=6)
        ax.set(title=f"Fashion-MNIST 10k, {st}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Label-error detection: precision-recall (mean of 3 seeds; dots: each method's own selection)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analyse(args) -> None:
    import label_issue_bench as B

    data = B.load_data(args.subset)
    settings = args.settings.split(",")
    res = {st: [] for st in settings}
    for st in settings:
        for seed in map(int, args.seeds.split(",")):
            r = evaluate_seed(B, args, data, st, seed)
            r["num_samples"] = len(data["clean"])
            res[st].append(r)
    text = "\n\n".join([detection_table(res, settings), score_table(res, settings), rate_table(res, settings),
                        demo_tables(res, settings)])
    print(text)
    if args.plot:
        plot(res, settings, args.plot)
    if args.doc:
        strip = {st: [{k: ({kk: vv for kk, vv in v.items() if kk != "pr"} if isinstance(v, dict) else v)
                       for k, v in r.items()} for r in rs] for st, rs in res.items()}
        with open(os.path.splitext(args.doc)[0] + ".json", "w") as f:
            json.dump(strip, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        write_tables(args.doc, text)


def write_tables(doc: str, text: str) -> None:
    """Puts the tables between the doc's <!-- tables --> and <!-- /tables --> markers."""
    start, end = "<!-- tables -->", "<!-- /tables -->"
    body = open(doc).read() if os.path.exists(doc) else f"{start}\n{end}\n"
    if start not in body or end not in body:
        raise SystemExit(f"{doc} has no {start} ... {end} markers for the tables")
    head, rest = body.split(start, 1)
    with open(doc, "w") as f:
        f.write(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
