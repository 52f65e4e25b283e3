#!/usr/bin/env python3
"""PyTorch eager baseline for grok-gpu-check's GEMV benchmark (scripts/gpu-check.sh step 4).

Times, with CUDA events (median of --reps runs, the L2 cache overwritten before each run), the
same GEMV shapes and row counts as dist/grok-gpu-check:
  - bf16: y = x @ W.T with x [m, in] and W [out, in] in bf16 (cuBLAS through PyTorch);
  - int8: W = (q.to(bf16) * scale) per block of the input dim, then x @ W.T: what a naive
    eager port of Grok-1's int8 weights does (dequantize every call);
plus a bf16 GEMM with m = 512 (prefill-like) and a 1 GiB device-to-device copy.
GB/s = weight bytes (bf16: 2 per weight; int8: 1 per weight + 4 per f32 scale) / median time,
the same definition as ours. Writes OUT/torch_bench.json; exits non-zero on failure.
"""

import argparse
import json
import os
import sys
import time
import traceback

GEMV_SHAPES = [  # (out, in, int8 scale blocks nb) as in grok-gpu-check
    (6144, 6144, 8),
    (32768, 6144, 1),
    (6144, 32768, 8),
]
ROWS = [1, 8, 64]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="only the [6144x6144] shape")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "torch_bench.json")
    result = {"tool": "gpu_torch_bench", "ok": False, "gemv": [], "gemm": [], "errors": []}
    t_start = time.time()

    def save():
        result["seconds"] = time.time() - t_start
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")

    try:
        import torch
    except Exception as e:  # noqa: BLE001
        result["errors"].append(f"import torch: {e}")
        print(f"error: cannot import torch: {e}")
        save()
        return 2
    if not torch.cuda.is_available():
        result["errors"].append("torch.cuda.is_available() is False")
        print("error: PyTorch sees no CUDA device")
        save()
        return 2

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    result.update(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        device=torch.cuda.get_device_name(dev),
        sm_count=props.multi_processor_count,
    )
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {result['device']}, {props.multi_processor_count} SMs")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def timeit(fn, reps, flush_l2=True):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if flush_l2:
                flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        us = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        return us[len(us) // 2], us[0]

    failed = False
    # Copy bandwidth (bytes read + written), to compare with grok-gpu-check's.
    try:
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        med, best = timeit(lambda: dst.copy_(src), 6, flush_l2=False)
        result["copy_gbps"] = 2 * n / (best * 1e-6) / 1e9
        print(f"copy 1 GiB: best {best:.1f} us = {result['copy_gbps']:.0f} GB/s (read + write)")
        del src, dst
    except Exception as e:  # noqa: BLE001
        failed = True
        result["errors"].append(f"copy: {e}")
        traceback.print_exc()

    shapes = GEMV_SHAPES[:1] if args.quick else GEMV_SHAPES
    for out_f, in_f, nb in shapes:
        try:
            g = torch.Generator(device=dev).manual_seed(1234)
            w = ((torch.rand(out_f, in_f, device=dev, generator=g) - 0.5) * 0.1).to(torch.bfloat16)
            q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, device=dev, generator=g)
            scales = torch.rand(nb, out_f, device=dev, generator=g) * 1.5e-3 + 0.5e-3  # f32 [nb, out]
            # The eager port keeps the scales next to the weights in bf16, laid out to broadcast.
            s_b = scales.t().contiguous().to(torch.bfloat16).view(out_f, nb, 1)

            def deq_matmul(x, q=q, s_b=s_b, out_f=out_f, in_f=in_f, nb=nb):
                wd = (q.view(out_f, nb, in_f // nb).to(torch.bfloat16) * s_b).view(out_f, in_f)
                return x @ wd.t()

            for m in ROWS:
                x = (torch.rand(m, in_f, device=dev, generator=g) * 2 - 1).to(torch.bfloat16)
                for dtype, fn, nbytes in (
                    ("bf16", lambda x=x, w=w: x @ w.t(), 2 * out_f * in_f),
                    ("int8", lambda x=x: deq_matmul(x), out_f * in_f + 4 * nb * out_f),
                ):
                    med, best = timeit(fn, args.reps)
                    gbps = nbytes / (med * 1e-6) / 1e9
                    print(f"  torch {dtype:<4} [{out_f}x{in_f}] m={m:<3} median {med:9.1f} us  min {best:9.1f} us  {gbps:6.0f} GB/s")
                    result["gemv"].append(dict(
                        dtype=dtype, out=out_f, **{"in": in_f}, nb=nb if dtype == "int8" else None,
                        m=m, median_us=med, min_us=best, gbps=gbps, weight_bytes=nbytes, reps=args.reps,
                        method="x @ W.T" if dtype == "bf16" else "(q.to(bf16) * scale) then x @ W.T",
                    ))
            del w, q, scales, s_b
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            failed = True
            result["errors"].append(f"gemv [{out_f}x{in_f}]: {e}")
            traceback.print_exc()

    gemm_shapes = [(6144, 6144)] if args.quick else [(6144, 6144), (32768, 6144)]
    for out_f, in_f in gemm_shapes:
        try:
            m = 512
            x = torch.randn(m, in_f, device=dev, dtype=torch.bfloat16)
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * 0.05
            med, best = timeit(lambda x=x, w=w: x @ w.t(), args.reps, flush_l2=False)
            tflops = 2 * m * out_f * in_f / (med * 1e-6) / 1e12
            print(f"  torch bf16 gemm m={m} [{out_f}x{in_f}]: median {med:.1f} us = {tflops:.0f} TFLOP/s")
            result["gemm"].append(dict(m=m, out=out_f, **{"in": in_f}, median_us=med, min_us=best, tflops=tflops))
        except Exception as e:  # noqa: BLE001
            failed = True
            result["errors"].append(f"gemm [{out_f}x{in_f}]: {e}")
            traceback.print_exc()

    result["ok"] = not failed
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
