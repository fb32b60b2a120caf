"""ForwardGraphs (engine/forward.py): which forwards replay from a captured graph, on a NumPy backend
given a stand-in `capture` (its "graph" calls the captured function again on launch, reading the
same fixed input buffer a CUDA graph would read). The real CUDA graphs: tests/test_cuda_backend_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest

from q4k_engine.backend import Batch
from q4k_engine.backend_cpu import NumpyBackend
from q4k_engine.errors import DeviceError, FallbackWarning
from q4k_engine.forward import ForwardGraphs, forward, upload
from q4k_engine.synthetic import synthetic_model


class Replay:
    """A captured function run again at each launch (a CUDA graph re-runs its kernels instead). Like a
    CUDA graph, it leaves its result in the buffer the capture returned: the output list the captured
    function appends to (ForwardGraphs' lambda) keeps that one array, rewritten at every launch."""

    def __init__(self, fn):
        self.fn, self.launches, self.nbytes = fn, 0, 1000
        self.outs = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, list))

    def launch(self):
        self.launches += 1
        self.fn()
        new = self.outs.pop()
        self.outs[-1][...] = new


class CapturingCpu(NumpyBackend):
    """The NumPy backend with a stand-in for CudaBackend.capture and batch_buffers."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail, self.captured, self.kept = fail, [], []

    def capture(self, fn):
        if self.fail:
            raise DeviceError("CUDA graph capture failed: a test's refusal")
        fn()  # a capture runs the Python once (recording its launches)
        self.captured.append(Replay(fn))
        return self.captured[-1]

    def batch_buffers(self, batch):
        self.kept.append(batch)
        return batch


@pytest.fixture(scope="module")
def model():
    return synthetic_model("qwen2", seed=3)


def eager(cfg, w, be, ids, lengths):
    return forward(cfg, w, be, ids, Batch.from_lengths(np.array(lengths, np.int64)), head=False)


def test_a_recurring_shape_replays_its_graph_on_new_ids(rng, model):
    """First sighting eager, the second captured and replayed, later ones replayed."""
    be = CapturingCpu()
    cfg, w = model.config, upload(model, be)
    graphs = ForwardGraphs(cfg, w, be, max_tokens=64, keep=2)
    lengths = [5, 11]
    kept = []
    for call in range(4):
        ids = rng.integers(0, cfg.vocab_size, sum(lengths)).astype(np.int32)
        kept.append((graphs.hidden(ids, lengths), eager(cfg, w, be, ids, lengths)))
        assert len(be.captured) == min(call, 1)
        assert call == 0 or be.captured[0].launches == call
    for got, want in kept:  # each call's own values: a copy of the buffer that later replays rewrite
        np.testing.assert_array_equal(got, want)
    assert len(be.kept) == 1 and list(np.diff(be.kept[0].cu_seqlens)) == lengths


def test_last_rows_of_a_replay(rng, model):
    """last_only: each sequence's last hidden row, from the replay as from the eager forward, each
    call's rows its own."""
    be = CapturingCpu()
    cfg, w = model.config, upload(model, be)
    graphs = ForwardGraphs(cfg, w, be, max_tokens=64)
    lengths = [4, 9, 2]
    kept = []
    for _ in range(4):
        ids = rng.integers(0, cfg.vocab_size, sum(lengths)).astype(np.int32)
        want = forward(cfg, w, be, ids, Batch.from_lengths(np.array(lengths, np.int64)), last_only=True, head=False)
        kept.append((graphs.hidden(ids, lengths, last_only=True), want))
    assert len(be.captured) == 1 and be.captured[0].launches == 3
    for got, want in kept:
        assert got.shape == (3, cfg.hidden)
        np.testing.assert_array_equal(got, want)


def test_shapes_that_do_not_recur_are_not_captured(rng, model, monkeypatch):
    """A workload of ever-new shapes pays no capture; the shapes seen once are a bounded memory."""
    import q4k_engine.forward as fw

    monkeypatch.setattr(fw, "GRAPH_SEEN", 3)
    be = CapturingCpu()
    cfg, w = model.config, upload(model, be)
    graphs = ForwardGraphs(cfg, w, be, max_tokens=64)
    ids = rng.integers(0, cfg.vocab_size, 16).astype(np.int32)
    for n in range(1, 9):
        np.testing.assert_array_equal(graphs.hidden(ids[:n], [n]), eager(cfg, w, be, ids[:n], [n]))
    assert not be.captured and list(graphs._seen) == [(6,), (7,), (8,)]
    graphs.hidden(ids[:1], [1])  # forgotten: a first sighting again
    assert not be.captured
    graphs.hidden(ids[:1], [1])
    assert len(be.captured) == 1


def test_shapes_above_the_limit_and_refused_captures_run_eagerly(rng, model):
    cfg = model.config
    be = CapturingCpu()
    w = upload(model, be)
    graphs = ForwardGraphs(cfg, w, be, max_tokens=16)
    ids = rng.integers(0, cfg.vocab_size, 17).astype(np.int32)
    for _ in range(2):
        np.testing.assert_array_equal(graphs.hidden(ids, [17]), eager(cfg, w, be, ids, [17]))
    assert not be.captured
    failing = CapturingCpu(fail=True)
    graphs = ForwardGraphs(cfg, upload(model, failing), failing)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no capture tried at a first sighting
        graphs.hidden(ids[:9], [9])
    with pytest.warns(FallbackWarning, match=r"1 sequence\(s\), 9 tokens, runs eagerly .* a test's refusal"):
        got = graphs.hidden(ids[:9], [9])
    np.testing.assert_array_equal(got, eager(cfg, graphs.w, failing, ids[:9], [9]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per shape
        np.testing.assert_array_equal(graphs.hidden(ids[:9], [9]), eager(cfg, graphs.w, failing, ids[:9], [9]))
    # No capture on a backend without one (the NumPy reference), and none with keep=0 (graphs=False).
    assert not ForwardGraphs(cfg, w, NumpyBackend()).enabled
    assert not ForwardGraphs(cfg, w, be, keep=0).enabled


def test_least_recently_used_shapes_are_dropped(rng, model):
    be = CapturingCpu()
    cfg, w = model.config, upload(model, be)
    graphs = ForwardGraphs(cfg, w, be, max_tokens=64, keep=2)
    ids = rng.integers(0, cfg.vocab_size, 12).astype(np.int32)
    for lengths in ([4], [4], [5], [5], [4], [6], [6], [5], [5]):
        graphs.hidden(ids[:sum(lengths)], lengths)
    # [4] captured at its second sighting, [5] too, [4] replayed (now newest), [6] captured and [5]
    # dropped; [5] is then new again: seen once, captured at the next, [4] dropped
    assert [tuple(np.diff(b.cu_seqlens)) for b in be.kept] == [(4,), (5,), (6,), (5,)]
    assert list(graphs._graphs) == [(6,), (5,)]
    assert graphs.pool_bytes() == 2000  # the kept graphs' pools only


def test_teacher_outputs_are_the_same_with_graphs(model, tmp_path):
    """The provider's outputs through ForwardGraphs (its default) equal an eager teacher's, every
    position and last position, on repeated calls of one shape."""
    from q4k_engine.provider import TeacherModel

    batch = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]]
    replayed = TeacherModel(model, CapturingCpu())
    plain = TeacherModel(model, NumpyBackend(), graphs=False)
    for _ in range(2):
        a, b = replayed.logits_per_position(batch), plain.logits_per_position(batch)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_array_equal(replayed.logits_for_batch(batch), plain.logits_for_batch(batch))
    assert len(replayed.backend.captured) == 1 and replayed.backend.captured[0].launches == 3
