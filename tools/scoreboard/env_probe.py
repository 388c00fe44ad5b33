"""What the scoreboard's ratios are read against: the GPU, its driver, CUDA and PyTorch
versions, and the copy bandwidth and bf16 GEMM rate measured now (the median of --reps
timed runs after a warm-up; on the CPU, small sizes that only check the script).
"""

import subprocess

import torch

from common import emit, parser, timed


def driver():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--gemm-size", type=int, default=8192)
    p.add_argument("--copy-bytes", type=int, default=4 << 30)
    a = p.parse_args()
    import transformers
    cuda = torch.device(a.device).type == "cuda"
    n = a.copy_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=a.device)
    dst = torch.empty_like(src)
    copy_s, _ = timed(lambda: dst.copy_(src), a.device, a.reps, a.budget_s / 2)
    del src, dst
    m = a.gemm_size
    x = torch.randn(m, m, device=a.device).to(torch.bfloat16)
    y = torch.randn(m, m, device=a.device).to(torch.bfloat16)
    gemm_s, _ = timed(lambda: x @ y, a.device, a.reps, a.budget_s / 2)
    emit({"row": "environment",
          "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)",
          "driver": driver() if cuda else None,
          "cuda": torch.version.cuda, "torch": torch.__version__,
          "transformers": transformers.__version__,
          # Bytes read and written.
          "copy_gb_s": 2 * n * 2 / copy_s / 1e9, "copy_bytes": 2 * n,
          "gemm_size": m, "gemm_tflops": 2 * m ** 3 / gemm_s / 1e12}, a.out)


if __name__ == "__main__":
    main()
