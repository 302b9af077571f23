# ruff: noqa: E401, E701, E702 - the one-off probe, kept verbatim as it ran (bench/RESULTS.md, "GPU probe")
"""One-off probe of the lent GPU: packages, SDPA backends at MLA head dims, FP8 matmul ops. Prints facts."""
import json, subprocess, sys, time
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

print("python", sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("no triton", e)
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
print("PIP", json.dumps({p["name"].lower(): p["version"] for p in json.loads(out)}))

def timeit(fn, n=3):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000

dev = "cuda"; H = 16
for L in (8192, 32768, 131072):
    q = torch.randn(1, H, L, 192, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, H, L, 192, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, H, L, 128, device=dev, dtype=torch.bfloat16)
    vp = F.pad(v, (0, 64))
    for name, be, vv in (("flash_padv", SDPBackend.FLASH_ATTENTION, vp), ("cudnn", SDPBackend.CUDNN_ATTENTION, v),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION, v), ("flash", SDPBackend.FLASH_ATTENTION, v)):
        try:
            with sdpa_kernel(be):
                ms = timeit(lambda: F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=0.07), n=2 if L > 50000 else 3)
            print(f"SDPA causal L={L} {name}: {ms:.1f} ms")
        except Exception as e:
            print(f"SDPA causal L={L} {name}: FAIL {str(e)[:150]}")
    # chunk of 8K/32K queries over the full prefix, non-causal (prefix part of a chunk)
    if L >= 32768:
        for qn in (8192, 32768):
            qq = q[:, :, :qn]
            for name, be, vv in (("flash_padv", SDPBackend.FLASH_ATTENTION, vp), ("cudnn", SDPBackend.CUDNN_ATTENTION, v), ("efficient", SDPBackend.EFFICIENT_ATTENTION, v)):
                try:
                    with sdpa_kernel(be):
                        ms = timeit(lambda: F.scaled_dot_product_attention(qq, k, vv, scale=0.07), n=2)
                    print(f"SDPA full q={qn} k={L} {name}: {ms:.1f} ms")
                except Exception as e:
                    print(f"SDPA full q={qn} k={L} {name}: FAIL {str(e)[:150]}")
    del q, k, v, vp
    torch.cuda.empty_cache()

# LSE-returning private ops
q = torch.randn(1, H, 4096, 192, device=dev, dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn(1, H, 4096, 128, device=dev, dtype=torch.bfloat16)
for name, fn in (
    ("aten._scaled_dot_product_flash_attention(padv)", lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, F.pad(v, (0, 64)), 0.0, True, False, scale=0.07)),
    ("aten._scaled_dot_product_efficient_attention", lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=0.07)),
    ("aten._scaled_dot_product_cudnn_attention", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.07)),
):
    try:
        r = fn(); print("LSE op", name, "ok", [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in r][:3])
    except Exception as e:
        print("LSE op", name, "FAIL", str(e)[:200])

# FP8
for M in (1, 16, 64, 2048):
    a = torch.randn(M, 2048, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(3072, 2048, device=dev).to(torch.float8_e4m3fn)
    sa = torch.ones(M, 1, device=dev); sb = torch.ones(1, 3072, device=dev)
    try:
        ms = timeit(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), n=20)
        print(f"_scaled_mm rowwise M={M}: ok {ms*1000:.1f} us")
    except Exception as e:
        print(f"_scaled_mm rowwise M={M}: FAIL {str(e)[:200]}")
    w = torch.randn(3072, 2048, device=dev, dtype=torch.bfloat16); x = torch.randn(M, 2048, device=dev, dtype=torch.bfloat16)
    print(f"bf16 mm M={M}: {timeit(lambda: x @ w.t(), n=20)*1000:.1f} us")
print("has _scaled_grouped_mm", hasattr(torch, "_scaled_grouped_mm"))
try:
    E, M, K, N = 64, 512, 2048, 1408
    a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn); b = torch.randn(E, N, K, device=dev).to(torch.float8_e4m3fn)
    offs = torch.arange(8, M + 1, 8, device=dev, dtype=torch.int32)[:E]
    r = torch._scaled_grouped_mm(a, b.transpose(1, 2), torch.ones(M, device=dev), torch.ones(E, N, device=dev), offs=offs, out_dtype=torch.bfloat16)
    print("_scaled_grouped_mm ok", tuple(r.shape))
except Exception as e:
    print("_scaled_grouped_mm FAIL", str(e)[:300])
# triton fp8 load
try:
    import triton, triton.language as tl
    @triton.jit
    def _k(x, y, s, N: tl.constexpr):
        o = tl.arange(0, N); tl.store(y + o, tl.load(x + o).to(tl.float32) * tl.load(s))
    x = torch.randn(128, device=dev).to(torch.float8_e4m3fn); y = torch.empty(128, device=dev); s = torch.tensor([2.0], device=dev)
    _k[(1,)](x, y, s, N=128); print("triton fp8 load ok", torch.allclose(y, x.float() * 2))
except Exception as e:
    print("triton fp8 FAIL", str(e)[:200])
# varlen attention APIs
try:
    import torch.nn.attention as A
    print("torch.nn.attention members", [m for m in dir(A) if not m.startswith("_")])
    try:
        from torch.nn.attention.varlen import varlen_attn
        qv = torch.randn(300, 16, 72, device=dev, dtype=torch.bfloat16)
        cu = torch.tensor([0, 100, 300], device=dev, dtype=torch.int32)
        o = varlen_attn(qv, qv, qv, cu, cu, 200, 200)
        print("varlen_attn ok", tuple(o.shape) if isinstance(o, torch.Tensor) else type(o))
    except Exception as e:
        print("varlen_attn FAIL", str(e)[:200])
except Exception as e:
    print("attention module FAIL", e)
print("free mem GiB", torch.cuda.mem_get_info()[0] / 2**30)
try:
    print("flash impls", A.list_flash_attention_impls(), "current", A.current_flash_attention_impl())
except Exception as e:
    print("flash impls FAIL", e)
try:
    from torch.nn.attention.varlen import varlen_attn
    import inspect; print("varlen sig", inspect.signature(varlen_attn))
    for qn, kn in ((8192, 131072), (32768, 131072), (131072, 131072)):
        q = torch.randn(qn, 16, 192, device=dev, dtype=torch.bfloat16)
        k = torch.randn(kn, 16, 192, device=dev, dtype=torch.bfloat16)
        for vd in (128, 192):
            v = torch.randn(kn, 16, vd, device=dev, dtype=torch.bfloat16)
            cq = torch.tensor([0, qn], device=dev, dtype=torch.int32); ck = torch.tensor([0, kn], device=dev, dtype=torch.int32)
            try:
                ms = timeit(lambda: varlen_attn(q, k, v, cq, ck, qn, kn, scale=0.07, window_size=(-1, 0)), n=2)
                o = varlen_attn(q[-4:], k[:kn], v, torch.tensor([0, 4], device=dev, dtype=torch.int32), ck, 4, kn, scale=0.07, window_size=(-1, 0))
                print(f"varlen causal q={qn} k={kn} v={vd}: {ms:.1f} ms")
            except Exception as e:
                print(f"varlen causal q={qn} k={kn} v={vd}: FAIL {str(e)[:200]}")
        del q, k, v; torch.cuda.empty_cache()
    # bottom-right alignment check on a small case vs explicit mask
    qn, kn = 64, 256
    q = torch.randn(qn, 16, 192, device=dev, dtype=torch.bfloat16); k = torch.randn(kn, 16, 192, device=dev, dtype=torch.bfloat16); v = torch.randn(kn, 16, 192, device=dev, dtype=torch.bfloat16)
    o = varlen_attn(q, k, v, torch.tensor([0, qn], device=dev, dtype=torch.int32), torch.tensor([0, kn], device=dev, dtype=torch.int32), qn, kn, scale=0.07, window_size=(-1, 0))
    from torch.nn.attention.bias import causal_lower_right
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(), v.transpose(0, 1)[None].float(), attn_mask=causal_lower_right(qn, kn), scale=0.07)[0].transpose(0, 1)
    print("varlen causal is bottom-right:", (o.float() - ref).abs().max().item())
except Exception as e:
    print("varlen probe FAIL", str(e)[:300])
