"""``dps-train --label-issues``: the run's likely label errors, from its DPS bank.

Writes ``<out>/<method>/label_issues.csv`` (index, given label, suggested label, score,
rank; see :func:`dps_fast.label_issues.find_label_issues`, default score and selection)
and returns the summary that goes into ``final.json`` under ``label_issues``; when the
trainer injected the noise, also precision, recall, F1, AUROC, precision@k and average
precision against the known flip mask. Every rank takes part (a sharded bank is scored
where it lives); only the lead rank writes.
"""
from __future__ import annotations

import csv
import os


from .. import label_issues


def write_issues_csv(issues, path: str, data) -> None:
    """LabelIssues.to_csv, with 'index' the user's own id of the sample: its .npz row when the
    trainer split or subset the data (then 'sample' is the trainer's position), its file for
    an ImageFolder set."""
    rows = data.row_ids
    files = data.train_set.files if data.streamed and data.train_set.files is not None else None
    if rows is None and files is None:
        issues.to_csv(path)
        return
    head = ["index", "given_label", "suggested_label", "score", "rank"]
    head += (["sample"] if rows is not None else []) + (["path"] if files is not None else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for k, (i, g, s, sc) in enumerate(zip(issues.indices.tolist(), issues.given_labels.tolist(),
                                              issues.suggested_labels.tolist(), issues.scores.tolist()), 1):
            row = [int(rows[i]) if rows is not None else i, g, s, f"{sc:.6g}", k]
            w.writerow(row + ([i] if rows is not None else []) + ([files[i]] if files is not None else []))


def write_label_issues(r, log) -> dict | None:
    """For a run ``r`` (dps_fast.train.loop.Run); None when not asked or not a DPS method."""
    if not getattr(r.args, "label_issues", False):
        return None
    dps = getattr(r.method, "dps", None)
    if dps is None:
        if r.lead:
            log(f"[{r.method_name}] --label-issues: no posterior bank in this method, nothing written")
        return None
    labels = r.data.labels.to(r.device)
    prior = {"c": r.cfg.get("c", 100.0), "eps": r.cfg.get("eps", 1e-2), "gamma": r.cfg.get("gamma", 0.95)}
    issues = label_issues.find_label_issues(dps, labels, prior_params=prior)
    noisy = r.data.noise_info["kind"] != "none"
    scores = label_issues.all_scores(dps, labels) if noisy else None
    if not r.lead:
        return None
    write_issues_csv(issues, os.path.join(r.out_dir, "label_issues.csv"), r.data)
    out = issues.summary()
    if noisy:
        flipped = (r.data.labels != r.data.clean_labels).cpu()
        out["against_flip_mask"] = label_issues.detection_metrics(scores.cpu(), flipped, issues.indices.cpu())
        out["realised_rate"] = float(flipped.double().mean())
    msg = (f"[{r.method_name}] label issues: {len(issues)} of {issues.num_samples} flagged "
           f"(estimated noise rate {issues.estimated_rate:.3f}) -> label_issues.csv")
    if noisy:
        m = out["against_flip_mask"]
        msg += (f"; against the injected flips: precision {m['precision']:.3f} recall {m['recall']:.3f} "
                f"F1 {m['f1']:.3f} AUROC {m['auroc']:.4f}")
    log(msg)
    return out
