"""A GPU workload with a known shape, to check that NVML samples line up with client spans.

    tracer capture --no-ebpf -o /tmp/gpu-cap -- python scripts/gpu_check/torch_workload.py
    python scripts/gpu_check/check_capture.py /tmp/gpu-cap

Idle ~1.5 s, then ~2 s of CUDA matrix products inside an OpenTelemetry span named ``gpu.phase``,
then idle ~1.5 s. CUDA start-up (context, cuBLAS handle, first kernel) happens before the first
idle phase, so the span holds only GPU work: the GPU turns busy at the span's start and idle at
its end, up to one kernel batch (a few ms). ``tracer capture`` installs the OTel SDK through
auto-instrumentation, so this script uses only the global API. It needs torch and a CUDA GPU;
Ollama is not involved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from opentelemetry import trace

SPAN_NAME = "gpu.phase"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=1.5)
    parser.add_argument("--busy-s", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=8192, help="matrix side (bf16)")
    args = parser.parse_args(argv)

    import torch  # type: ignore[import-not-found, unused-ignore]

    if not torch.cuda.is_available():
        print("torch_workload: no CUDA device; run this on a GPU machine.", file=sys.stderr)
        return 2
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    product = torch.empty_like(a)
    torch.matmul(a, b, out=product)  # warm-up: cuBLAS handle and kernel selection, a few ms of GPU time
    torch.cuda.synchronize()

    tracer = trace.get_tracer("tracer.gpu_check")
    time.sleep(args.idle_s)
    batches = 0
    with tracer.start_as_current_span(SPAN_NAME) as span:
        start_ns = time.time_ns()
        deadline = time.monotonic() + args.busy_s
        while time.monotonic() < deadline:
            # Small batches, each waited for: the queue never runs far past the deadline, so the
            # GPU goes idle within one batch of the span's end.
            for _ in range(8):
                torch.matmul(a, b, out=product)
            torch.cuda.synchronize()
            batches += 1
        torch.cuda.synchronize()
        end_ns = time.time_ns()
    time.sleep(args.idle_s)

    context = span.get_span_context()
    report = {
        "span": SPAN_NAME, "start_ns": start_ns, "end_ns": end_ns, "duration_ms": (end_ns - start_ns) / 1e6,
        "sdk_start_ns": getattr(span, "start_time", None), "sdk_end_ns": getattr(span, "end_time", None),
        "trace_id": f"{context.trace_id:032x}", "exported": context.is_valid,
        "batches": batches, "matmuls": batches * 8, "size": args.size,
        "device": torch.cuda.get_device_name(0),
    }
    print(json.dumps(report))
    if not context.is_valid:
        print("torch_workload: no OpenTelemetry SDK is installed, so the span went nowhere; "
              "run this under `tracer capture`.", file=sys.stderr)
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "force_flush", None)
    if callable(flush):
        flush()  # the span must reach the capture's receiver before the process exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
