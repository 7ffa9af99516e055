"""Where a timm model's forward spends its GPU time (torch.profiler), and which attention backends it used."""

import sys

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import visattn
from visattn import functional

name, batch = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else ("nat_tiny", 256)
model = timm.create_model(name).cuda().half().eval()
x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half)
seen = set()
original = functional._choose


def spy(op, backend, q, *args, **kwargs):
    chosen = original(op, backend, q, *args, **kwargs)
    seen.add((op, chosen, tuple(q.shape), str(q.dtype)))
    return chosen


functional._choose = spy
with torch.no_grad():
    for _ in range(3):
        model(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        model(x)
        torch.cuda.synchronize()
for item in sorted(seen):
    print(item)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
