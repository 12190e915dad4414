"""bf16 against fp32 1024x1024 matmul GFLOP/s on one thread, alternating, three rounds:
`python benchmarks/matmul_dtypes.py` (the ratio within a round is the reading on a loaded machine)."""
import time

import torch

torch.set_num_threads(1)
for rep in range(3):
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(1024, 1024).to(dt)
        b = torch.randn(1024, 1024).to(dt)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        n = 40
        for _ in range(n):
            a @ b
        el = time.perf_counter() - t
        print(rep, dt, round(2 * 1024**3 * n / el / 1e9), "GFLOP/s", flush=True)
