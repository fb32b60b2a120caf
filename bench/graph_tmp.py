import sys, time, traceback, numpy as np, cupy as cp
sys.path.insert(0, "bench")
import make_7b
from q4k_engine.backend import Batch
from q4k_engine.backend_cuda import CudaBackend
from q4k_engine.forward import forward, upload
from q4k_engine.loader import open_model
model = open_model(make_7b.ensure_7b(None)); cfg = model.config
be = CudaBackend(); w = upload(model, be)
rng = np.random.default_rng(0)
from q4k_engine.kernels import matmul as mm
for fm, lengths in ((64, [128]), (128, [128]), (64, [128]), (128, [128])):
    mm.FUSED_MAX_M = fm
    print('FUSED_MAX_M', fm)
    try:
        batch = Batch.from_lengths(lengths)
        ids = cp.asarray(rng.integers(0, cfg.vocab_size, batch.n_tokens).astype(np.int32))
        out = {}
        def run():
            out["y"] = forward(cfg, w, be, ids, batch, last_only=False, dtype=np.float16)
        def eager_ms(reps=7):
            run(); cp.cuda.Device().synchronize(); ts = []
            for _ in range(reps):
                t = time.perf_counter(); run(); cp.cuda.Device().synchronize(); ts.append((time.perf_counter() - t) * 1e3)
            return float(np.median(ts))
        e1 = eager_ms()
        if fm == 64:
            print(f'eager {e1:.2f} ms'); continue
        g = be.capture(run)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            g.launch(); s.synchronize(); ts = []
            for _ in range(7):
                a, b = cp.cuda.Event(), cp.cuda.Event()
                a.record(s); g.launch(); b.record(s); b.synchronize(); ts.append(cp.cuda.get_elapsed_time(a, b))
        e2 = eager_ms()
        print(f"{len(lengths)}x{lengths[0]}: eager {min(e1, e2):.2f} ms (rounds {e1:.2f}, {e2:.2f}); graph replay {np.median(ts):.2f} ms "
              f"-> {sum(lengths) / np.median(ts) * 1e3:.0f} tok/s", flush=True)
        del g
    except Exception:
        traceback.print_exc()
