"""export_soft_labels of a top-k bank from its compressed rows (docs/method.md §12): a
1M x 21,841 bank at k = 32, three steps, then a top-32 float16 export; time, size and peak RSS.

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536 python tools/topk_export_probe.py
"""
import time, torch, os, dps_fast, resource
from dps_fast import soft_labels as S
torch.set_num_threads(1)
N, C, K = 1_000_000, 21841, 32
crit = dps_fast.DPSLoss(torch.randint(0, C, (N,)), C, top_k=K, tau_e=1.0)
g = torch.Generator().manual_seed(0)
for _ in range(3):
    idx = torch.randperm(N, generator=g)[:1024]
    crit(torch.randn(1024, C, generator=g) * 3, idx)
t0 = time.perf_counter()
info = S.export_soft_labels(crit, "/tmp/exp.safetensors", top_k=K)
dt = time.perf_counter() - t0
print(f"N={N} C={C} k={K}: export top_k={K} float16 in {dt:.1f} s, {info['bytes']/1e6:.0f} MB "
      f"({info['bytes_per_sample']:.0f} B/sample), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.2f} GB")
os.remove("/tmp/exp.safetensors")
