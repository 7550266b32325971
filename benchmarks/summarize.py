"""Summarise a pytest-benchmark JSON (from `make bench`) into the README table.

    python benchmarks/summarize.py benchmarks/results

Writes <dir>/cpu-summary.json and <dir>/cpu-summary.md: per shape, the median
times of eager / torch.compile / fused (measured in one run), the speedups, the
fused GB/s from the byte model, the same run's copy bandwidth and the ratio.
"""
import json
import os
import sys


def summarize(raw: dict) -> dict:
    env = raw.get("dps_fast", {})
    copy = env.get("copy_gbps")
    groups = {}
    for bm in raw["benchmarks"]:
        info = bm["extra_info"]
        groups.setdefault(bm["group"], {})[info["provider"]] = {"median_s": bm["stats"]["median"], **info}
    rows = []
    for name, prov in groups.items():
        if not {"eager", "fused"} <= set(prov):
            continue
        f, e, c = prov["fused"], prov["eager"], prov.get("compile")
        row = {"case": name, "op": f["op"], "eager_ms": 1e3 * e["median_s"], "fused_ms": 1e3 * f["median_s"],
               "speedup_vs_eager": e["median_s"] / f["median_s"]}
        if c:
            row["compile_ms"] = 1e3 * c["median_s"]
            row["speedup_vs_compile"] = c["median_s"] / f["median_s"]
        if "bytes" in f:
            row["fused_gbps"] = f["bytes"] / f["median_s"] / 1e9
            if copy:
                row["copy_gbps"] = copy
                row["fraction_of_copy"] = row["fused_gbps"] / copy
        if "peak_extra_bytes" in f:
            row["fused_peak_mb"] = f["peak_extra_bytes"] / 2 ** 20
            row["eager_peak_mb"] = e["peak_extra_bytes"] / 2 ** 20
            if c:
                row["compile_peak_mb"] = c["peak_extra_bytes"] / 2 ** 20
            row["peak_fraction_of_eager"] = f["peak_extra_bytes"] / max(1, e["peak_extra_bytes"])
        rows.append(row)
    return {"environment": env.get("environment"), "copy_gbps": copy, "rows": rows,
            "datetime": raw.get("datetime"), "machine_info": raw.get("machine_info", {}).get("cpu", {}).get("brand_raw")}


def markdown(s: dict) -> str:
    env = s.get("environment") or {}
    out = [f"Measured {env.get('date', s.get('datetime'))} on {env.get('processor')} "
           f"({env.get('threads')} threads), torch {env.get('torch')}, "
           f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_')} "
           f"MALLOC_TRIM_THRESHOLD_={env.get('MALLOC_TRIM_THRESHOLD_')}; copy bandwidth in the same run "
           f"{s['copy_gbps']:.1f} GB/s. Medians.", "",
           "| case | eager ms | compile ms | fused ms | vs eager | vs compile | fused GB/s | of copy BW | peak MB fused / eager |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        peak = f"{r['fused_peak_mb']:.0f} / {r['eager_peak_mb']:.0f}" if "fused_peak_mb" in r else ""
        out.append(f"| {r['case']} | {r['eager_ms']:.3f} | {r.get('compile_ms', float('nan')):.3f} | "
                   f"{r['fused_ms']:.3f} | {r['speedup_vs_eager']:.2f}x | {r.get('speedup_vs_compile', float('nan')):.2f}x | "
                   f"{r.get('fused_gbps', float('nan')):.1f} | "
                   f"{100 * r['fraction_of_copy']:.0f}% | {peak} |".replace("nan%", "") if "fraction_of_copy" in r else
                   f"| {r['case']} | {r['eager_ms']:.3f} | {r.get('compile_ms', float('nan')):.3f} | "
                   f"{r['fused_ms']:.3f} | {r['speedup_vs_eager']:.2f}x | {r.get('speedup_vs_compile', float('nan')):.2f}x | "
                   f" |  | {peak} |")
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
