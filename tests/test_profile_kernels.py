"""bench/profile_kernels.py without a GPU: reading ncu's raw CSV page (units row included) into the
table, and its refusals. The sample is a column subset of a real run (H200, the Q4_K down
projection at M = 8, bench/RESULTS.md seventh session)."""
from __future__ import annotations

import math

import pytest
from bench_scripts import bench_module

pk = bench_module("profile_kernels")

STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
SAMPLE = (
    '"Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum",'
    '"gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed","lts__t_bytes.sum",'
    '"sm__warps_active.avg.pct_of_peak_sustained_active","sm__maximum_warps_per_active_cycle_pct",'
    '"launch__registers_per_thread","launch__grid_size","smsp__issue_active.avg.pct_of_peak_sustained_active",'
    '"sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",'
    + ",".join(f'"{STALL.format(r)}"' for r in ("long_scoreboard", "wait", "selected", "barrier", "not_selected"))
    + "\n"
    '"","us","Mbyte","%","Mbyte","%","%","register/thread","","%","%","inst","inst","inst","inst","inst"\n'
    '"mmv_x","2.720000","0.611072","4.752392","1.678240","13.503295","100.000000","18","148","13.378455",'
    '"0.000000","6.727544","2.014585","1.000000","0.000000","0.225223"\n'
    '"mmv_r1","21.920000","38.539264","38.376152","92.316800","20.541904","25.000000","128","224","34.874724",'
    '"9.552314","4.872426","1.208238","0.999981","0.479211","0.643791"\n'
)


def test_parse_and_summarize_in_base_units():
    kernels = pk.parse_raw(SAMPLE)
    assert [k["Kernel Name"] for k in kernels] == ["mmv_x", "mmv_r1"]
    row = pk.summarize("m8-down-q4k", kernels)[1]
    assert row["kernel"] == "mmv_r1" and row["case"] == "m8-down-q4k"
    assert row["us"] == pytest.approx(21.92)
    assert row["dram_MB"] == pytest.approx(38.539264)
    assert row["dram_TBps"] == pytest.approx(38.539264e6 / 21.92e-6 / 1e12)  # 1.76 TB/s
    assert row["dram_pct"] == pytest.approx(38.376152) and row["regs"] == 128 and row["grid"] == 224
    assert row["stall_cyc"] == pytest.approx(4.872426 + 1.208238 + 0.999981 + 0.479211 + 0.643791)
    assert row["stalls"] == "long_scoreboard 4.9, wait 1.2, selected 1.0, not_selected 0.6"


def test_units_and_missing_values():
    k = {"t": "1,500", "b": "3", "n": "n/a", "__units": {"t": "nsecond", "b": "Kbyte", "n": "%"}}
    assert pk.num(k, "t") == pytest.approx(1.5e-6)
    assert pk.num(k, "b") == pytest.approx(3e3)
    assert math.isnan(pk.num(k, "n")) and math.isnan(pk.num(k, "absent"))


def test_table_has_a_row_a_kernel():
    text = pk.table(pk.summarize("m8-down-q4k", pk.parse_raw(SAMPLE)))
    lines = text.splitlines()
    assert lines[0].startswith("| case | kernel | us |") and len(lines) == 4
    assert "| m8-down-q4k | mmv_r1 | 21.9 |" in lines[3]


def test_refuses_text_that_is_not_a_raw_page():
    with pytest.raises(ValueError, match="raw CSV"):
        pk.parse_raw("")


def test_refuses_bad_arguments_and_a_missing_ncu_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["profile_kernels.py", "--cases", "m8-down-q4k,m3-nothing"])
    with pytest.raises(SystemExit) as e:
        pk.main()
    assert e.value.code == 2 and "unknown case(s) m3-nothing" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["profile_kernels.py", "--out", "/nonexistent-dir/table.md"])
    with pytest.raises(SystemExit) as e:
        pk.main()
    assert e.value.code == 2 and "directory /nonexistent-dir does not exist" in capsys.readouterr().err
    monkeypatch.setattr(pk.shutil, "which", lambda name: None)
    monkeypatch.setattr(pk.os.path, "exists", lambda path: False)
    with pytest.raises(SystemExit) as e:
        pk.ncu_path()
    assert e.value.code == 2 and "ncu (Nsight Compute) not found" in capsys.readouterr().err
