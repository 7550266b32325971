"""What tau_e="auto" (DPSLoss's default) costs a step: DPSLoss forward with tau_e=1.0 and with
"auto", side by side in one run, one thread, medians of 7 rounds of 50 calls (docs/results.md
section 6d). The difference is the statistic's B-row gather from the bank.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536 python benchmarks/tau_auto_cost.py
"""
import time, torch, dps_fast
torch.set_num_threads(1)
for B, C, N in [(128, 10, 50000), (256, 1000, 50000)]:
    res = {}
    for tau in [1.0, "auto"]:
        crit = dps_fast.DPSLoss(torch.randint(0, C, (N,)), C, tau_e=tau)
        z = torch.randn(B, C, requires_grad=True)
        idxs = [torch.randperm(N)[:B] for _ in range(50)]
        ts = []
        for r in range(7):
            t0 = time.perf_counter()
            for i in idxs:
                crit(z, i)
            ts.append((time.perf_counter() - t0) / len(idxs) * 1e6)
        res[tau] = sorted(ts)[3]
    print(B, C, {k: f"{v:.1f} us" for k, v in res.items()})
