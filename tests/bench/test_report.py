"""`pidec.bench.report`: the table of a run, its column legend, why the rows slow by design are
slow, the cross-checks and skipped configurations. Results are written by hand here: the report
formats, it does not measure (tests/bench/test_harness.py formats a real run)."""

from pidec.bench.report import COLUMNS, HEADER, format_table, slow_notes


def row(config, latency, steps=2.0, speedup=None):
    return {
        "config": config,
        "precision": "float32",
        "latency_s_median": latency,
        "docs_per_s": 1 / latency,
        "tokens_per_s": 60 / latency,
        "peak_mem_mb": 10.0,
        "gflops_per_doc": 5.0,
        "achieved_gflops_per_s": 5.0 / latency,
        "ceiling_fraction": 0.5,
        "cross_cache_mb": 1.0,
        "step_mb": 20.0,
        "step_parts_mb": {"weights": 18.0, "cross": 1.0, "self": 1.0},
        "decode_steps": steps,
        "speedup_vs_hf_pie": speedup,
    }


def result(rows, **more):
    out = {
        "workload": "dst",
        "model": {"size": "base", "params": 247.6e6},
        "device": "cpu",
        "dtype": "float32",
        "torch_threads": 2,
        "docs": 2,
        "repeats": 2,
        "results": rows,
    }
    return {**out, **more}


DST = [
    row("hf-pie", 30.0, 10, 1.0),
    row("pidec-seq", 12.0, 290, 2.5),
    row("pidec-pid", 1.5, 10, 20.0),
]


def test_every_column_is_explained_under_the_table():
    table = format_table(result(DST))
    legend = table[table.index("columns:") :]
    for name in HEADER.split()[1:]:
        if name != "docs/s":  # documents per second: the latency's inverse, said by its name
            assert f"  {name} " in legend, name
    assert {name for name, _ in COLUMNS} >= {"%ceil", "MB/step", "cross_MB", "GFLOP/s"}
    assert "columns:" not in format_table(result([], skipped=[{"configs": ["ct2-pie"], "reason": "r"}]))


def test_slow_notes_say_why_seq_is_slow():
    notes = slow_notes(DST)
    assert notes[0] == "slower by design:"
    seq = next(n for n in notes if "pidec-seq" in n)
    assert "290 sequential steps" in seq and "pidec-pid's rows take 10" in seq
    assert any("hf-pie" in n and "once per subtask" in n for n in notes)
    assert not any("pidec-pid:" in n for n in notes)  # the fastest row needs no excuse
    assert slow_notes([row("pidec-pid", 1.0)]) == []
    assert slow_notes([row("pidec-seq", 1.0), row("pidec-pid", 2.0)]) == []  # seq the fastest: nothing to say
    assert slow_notes([row("pidec-seq-int8", 3.0, 290), row("pidec-pid-int8", 1.0, 10)])[1].startswith(
        "  pidec-seq-int8: one row writes"
    )


def test_table_holds_rows_notes_and_checks():
    r = result(DST, agree=True, logits_gap=2.5e-11, logits_agree=True, agree_ct2=None, packed_weights=True)
    table = format_table(r)
    assert "workload dst  model base (247.6M params)" in table and "oneDNN-packed weights" in table
    for name in ("hf-pie", "pidec-seq", "pidec-pid"):
        assert f"\n{name} " in table
    assert "20.00x" in table and "slower by design:" in table
    assert "first tokens agree: True" in table and "max difference 2.5e-11" in table
