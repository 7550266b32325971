"""A short table of a device check's results.jsonl (benchmarks/gpu_check.sh prints it last:
the device reply carries only the end of the output). Standard library only.

    python benchmarks/gpu_summary.py OUT_DIR/results.jsonl
"""
import json
import sys


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    rows.append({"kind": "broken line", "text": line[:80]})
    return rows


def stage_lines(rows):
    yield "stage      status    time/limit  reason"
    for r in rows:
        if r.get("kind") == "stage":
            yield f"{r['stage']:<10} {r['status']:<9} {r['elapsed_s']:>4}/{r['limit_s']:<5}  {r.get('reason', '')[:70]}"


def kernel_lines(rows):
    backends = next((r["backends"] for r in rows if r.get("kind") == "copy_peak"), [])
    yield "kernel case                          " + "  ".join(f"{b + ' GB/s (of copy)':>22}" for b in backends)
    for r in rows:
        if r.get("kind") != "kernel":
            continue
        case = f"{r['op']} B={r['B']} C={r['C']} V={r['V']} {r['logits']}/{r['bank']}"
        if r["status"] == "skipped":
            yield f"{case:<36} skipped: {r.get('reason')}"
            continue
        cells = [f"{r.get(b + '_gbps', 0):>12.0f} ({r.get(b + '_of_copy', 0):4.2f})" if b + "_gbps" in r
                 else f"{'error':>22}" for b in backends]
        yield f"{case:<36} " + "  ".join(f"{c:>22}" for c in cells)


def step_lines(rows):
    for r in rows:
        if r.get("kind") != "step":
            continue
        ms = {k[:-3]: v for k, v in r.items() if k.endswith("_ms") and v}
        shape = f"B={r['B']} C={r['C']} {r['logits']}" if "B" in r else f"M={r.get('M')} d={r.get('d')}" \
            if "M" in r else str(r.get("shape"))
        yield f"{r['op']} {shape}: " + (", ".join(f"{k} {v:.3g} ms" for k, v in ms.items()) or r["status"])


def main(path):
    rows = load(path)
    for part in (stage_lines, kernel_lines, step_lines):
        for line in part(rows):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
