"""bf16 1024x1024 matmul GFLOP/s with N torch threads: `python benchmarks/matmul_threads.py N`."""
import torch,time,sys
torch.set_num_threads(int(sys.argv[1]))
a=torch.randn(1024,1024).bfloat16();b=torch.randn(1024,1024).bfloat16()
for _ in range(5): a@b
t=time.perf_counter(); n=200
for _ in range(n): a@b
el=time.perf_counter()-t; print(sys.argv[1], 'threads', round(2*1024**3*n/el/1e9),'GFLOP/s')
