"""Summarise a pytest-benchmark JSON (from `make bench`) into the table of docs/performance.md.

    python benchmarks/summarize.py benchmarks/results

Writes <dir>/cpu-summary.json and <dir>/cpu-summary.md: per case, the median times
of every provider measured in the run (the reference eager and torch.compile'd, the
step written by hand eager and torch.compile'd where the case has it, the fused
kernel), the fused speedups over each, the fused GB/s on the case's byte model, the
copy bandwidth of the same run and the ratio.
"""
import json
import os
import sys

# provider -> column label; the fused kernel is compared with each
BASELINES = {"eager": "ref eager", "compile": "ref compile", "hand": "hand eager", "hand_compile": "hand compile"}


def summarize(raw: dict) -> dict:
    env = raw.get("dps_fast", {})
    copy = env.get("copy_gbps")
    groups = {}
    for bm in raw["benchmarks"]:
        info = bm["extra_info"]
        groups.setdefault(bm["group"], {})[info["provider"]] = {"median_s": bm["stats"]["median"], **info}
    rows = []
    for name, prov in groups.items():
        if "fused" not in prov:
            continue
        f = prov["fused"]
        row = {"case": name, "op": f["op"], "fused_ms": 1e3 * f["median_s"]}
        for p in BASELINES:
            if p in prov:
                row[f"{p}_ms"] = 1e3 * prov[p]["median_s"]
                row[f"speedup_vs_{p}"] = prov[p]["median_s"] / f["median_s"]
        if "bytes" in f:
            row["bytes"] = f["bytes"]
            row["fused_gbps"] = f["bytes"] / f["median_s"] / 1e9
            if copy:
                row["copy_gbps"] = copy
                row["fraction_of_copy"] = row["fused_gbps"] / copy
        if "peak_extra_bytes" in f:
            row["fused_peak_mb"] = f["peak_extra_bytes"] / 2 ** 20
            for p in ("eager", "compile"):
                if p in prov:
                    row[f"{p}_peak_mb"] = prov[p]["peak_extra_bytes"] / 2 ** 20
            if "eager" in prov:
                row["peak_fraction_of_eager"] = f["peak_extra_bytes"] / max(1, prov["eager"]["peak_extra_bytes"])
        rows.append(row)
    return {"environment": env.get("environment"), "copy_gbps": copy, "copy_gbps_runs": env.get("copy_gbps_runs"),
            "load_avg": env.get("load_avg"), "rows": rows, "datetime": raw.get("datetime"),
            "machine_info": raw.get("machine_info", {}).get("cpu", {}).get("brand_raw")}


def _cell(r, key, fmt):
    return fmt.format(r[key]) if key in r else ""


def markdown(s: dict) -> str:
    env = s.get("environment") or {}
    runs = s.get("copy_gbps_runs") or [s["copy_gbps"]]
    load = s.get("load_avg")
    out = [f"Measured {env.get('date', s.get('datetime'))} on {env.get('processor')} "
           f"({env.get('threads')} threads), torch {env.get('torch')}, "
           f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_')} "
           f"MALLOC_TRIM_THRESHOLD_={env.get('MALLOC_TRIM_THRESHOLD_')}; copy bandwidth in the same run "
           f"{s['copy_gbps']:.1f} GB/s (median of {', '.join(f'{x:.1f}' for x in runs)})"
           + (f"; load average at the end {load[0]:.1f}" if load else "") + ". Medians. "
           "ref = the reference implementation (with its policies), hand = the step written by hand "
           "(benchmarks/common.py::dps_by_hand).", "",
           "| case | " + " | ".join(f"{v} ms" for v in BASELINES.values()) + " | fused ms | "
           + " | ".join(f"vs {v}" for v in BASELINES.values()) + " | fused GB/s | of copy BW | peak MB fused / eager |",
           "|---|" + "---|" * (2 * len(BASELINES) + 4)]
    for r in s["rows"]:
        peak = f"{r['fused_peak_mb']:.0f} / {r['eager_peak_mb']:.0f}" if "fused_peak_mb" in r else ""
        cells = [r["case"]] + [_cell(r, f"{p}_ms", "{:.3f}") for p in BASELINES] + [f"{r['fused_ms']:.3f}"]
        cells += [_cell(r, f"speedup_vs_{p}", "{:.2f}x") for p in BASELINES]
        cells += [_cell(r, "fused_gbps", "{:.1f}"), _cell(r, "fraction_of_copy", "{:.0%}"), peak]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(folder):
    src = os.path.join(folder, "pytest-benchmark-cpu.json")
    with open(src) as f:
        raw = json.load(f)
    s = summarize(raw)
    with open(os.path.join(folder, "cpu-summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    md = markdown(s)
    with open(os.path.join(folder, "cpu-summary.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results"))
