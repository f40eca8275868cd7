"""The benchmark runs end to end at tiny sizes and writes its tables, figures and page (timings unchecked)."""

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks.grid import GRID_CONTENDERS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_run_writes_tables_and_page(tmp_path):
    for module in ("torch", "flax", "matplotlib"):
        pytest.importorskip(module, reason=f"the benchmark needs {module} (the torch and bench extras)")
    page = tmp_path / "performance.md"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--shape",
        "2,16,16,2",
        "--sizes",
        "64",
        "--long-contenders",
        "torch,noxton_eqx",
        "--se-shapes",
        "1,8,4;2,8,4",
        "--grid-sizes",
        "16",
        "--grid-batches",
        "1",
        "--grid-widths",
        "16/2",
        "--depths",
        "2",
        "--compile-repeats",
        "1",
        "--out",
        str(tmp_path / "results"),
        "--page",
        str(page),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    headings = ("## B=2, L=S=16, E=16, H=2", "## Eager call", "## SqueezeExcitation", "## Compile time", "## The grid")
    headings += ("## Long",)
    for heading in headings:
        assert heading in result.stdout
        assert heading in page.read_text()
    figures = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(figures["main"]) == 22 and len(figures["se"]) == 2 and len(figures["eager"]) == 4
    # one layer, then the encoder at depth 2
    rows = [(r["model"], r["layers"]) for r in figures["compile"]]
    assert rows == [("one TransformerEncoderLayer", 1), ("TransformerEncoder", 2)]
    assert all(r["forward_s"] > 0 and r["gradient_s"] > 0 and r["gradient_run_s"] > 0 for r in figures["compile"])
    long_rows = {(r["name"], r["mode"]) for r in figures["long"]}
    assert long_rows == {(n, m) for n in ("torch", "noxton_eqx") for m in ("fwd", "fwd_bwd")}
    assert (tmp_path / "performance_long_sequences.png").stat().st_size > 0
    # the grid: one point per mode, every contender timed there, and its heat map on the page
    assert [(p["mode"], p["B"], p["E"], p["H"], p["L"]) for p in figures["grid"]] == [
        ("fwd", 1, 16, 2, 16),
        ("fwd_bwd", 1, 16, 2, 16),
    ]
    assert all(set(p["median_s"]) == set(GRID_CONTENDERS) for p in figures["grid"])
    assert (tmp_path / "performance_grid.png").stat().st_size > 0
    assert "![noxton auto against the fastest peer" in page.read_text()
    assert "![time and peak memory" in page.read_text()


def test_decoding_quick_run_prints_its_table_and_writes_its_section(tmp_path):
    for module in ("torch", "flax"):
        pytest.importorskip(module, reason=f"the decoding benchmark needs {module} (the torch and bench extras)")
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n\n## The run\n\nbefore\n\n## Decoding with a key/value cache\n\nold figures\n")
    sizes = "--layers 1 --d-model 16 --nhead 2 --ff 32 --memory 4 --batch 2 --steps 8 --repeats 1".split()
    cmd = [sys.executable, "-m", "benchmarks.decoding", "--quick", *sizes, "--out", str(tmp_path), "--page", str(page)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "## Decoding with a key/value cache" in result.stdout
    names = (
        "noxton_cached",
        "noxton_cached_shared_index",
        "noxton_recompute",
        "torch_recompute",
        "flax_nnx_cached",
        "flax_nnx_cached_memkv",
    )
    for name in names:
        assert f"| `{name}` |" in result.stdout
    assert "| 8 | 3,184 (0.0 MiB) |" in result.stdout  # the cache at max_len = steps, then 2 * steps
    assert "| 16 | 5,296 (0.0 MiB) |" in result.stdout
    figures = json.loads((tmp_path / "decoding.json").read_text())
    assert set(figures["per_token_s"]) == set(names) and all(v > 0 for v in figures["per_token_s"].values())
    assert all(d <= 1e-4 for d in figures["max_abs_diff"].values())
    # the section replaced the old one, once, after what came before it
    text = page.read_text()
    assert text.startswith("# Performance\n\n## The run\n\nbefore\n\n## Decoding with a key/value cache\n\n")
    assert "old figures" not in text and text.count("## Decoding") == 1 and "| `noxton_cached` |" in text


def test_page_rewrite_keeps_the_gpu_and_decoding_sections(tmp_path):
    from benchmarks import report

    page = tmp_path / "performance.md"
    gpu = "## On a GPU\n\ngpu figures\n\n### A table\n\n| g |\n|---|"
    page.write_text(f"# old\n\n## Long\n\nold table\n\n{gpu}\n\n## Decoding with a key/value cache\n\n| a |\n|---|\n")
    report.write(str(tmp_path / "out"), str(page), "cmd", "conditions", ["## Main\n\nnew"], {"long": [], "grid": []})
    text = page.read_text()
    assert "old table" not in text and "## Main\n\nnew" in text
    assert text.endswith(f"## Main\n\nnew\n\n{gpu}\n\n## Decoding with a key/value cache\n\n| a |\n|---|\n")


@pytest.mark.parametrize("settle", [0, 2])
def test_medians_settles_a_call_that_follows_another_librarys(monkeypatch, settle):
    """With ``settle``, a call right after another library's is first made ``settle`` times untimed; a call after
    one of its own library is timed as it comes."""
    from benchmarks import measure
    from benchmarks.grid import library

    log = []
    clock = iter(range(10**6))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: log.append("clock") or next(clock))
    names = ("torch", "noxton_eqx", "eqx", "torch_matmul")
    med = measure.medians({n: lambda n=n: log.append(n) for n in names}, 6, 1, settle, library)
    assert med == dict.fromkeys(names, 1)  # each timed call: two clock readings around it, one tick apart
    log = log[len(names) :]  # after the warm-up calls
    timed, previous, switches = 0, None, 0
    while log:
        untimed = []
        while log[0] != "clock":
            untimed.append(log.pop(0))
        assert log[:3] == ["clock", log[1], "clock"], log[:3]  # a timed call
        name = log[1]
        del log[:3]
        switched = previous is not None and library(previous) != library(name)
        switches += switched
        assert untimed == [name] * (settle if switched else 0), (previous, name, untimed)
        previous, timed = name, timed + 1
    assert timed == 6 * len(names) and switches > 0


def test_samples_settles_every_call_without_a_library_and_counts_what_each_call_adds(monkeypatch):
    """Without ``library``, every timed call is first made ``settle`` times untimed; ``counter``'s growth over each
    timed call (the untimed ones not counted) is recorded beside its time."""
    from benchmarks import measure

    log, count = [], [0]
    clock = iter(range(10**6))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))

    def call(n):
        def f():
            log.append(n)
            count[0] += n

        return f

    keys = (1, 2, 3)
    out = measure.samples({n: call(n) for n in keys}, 4, warmup=1, settle=2, counter=lambda: count[0])
    assert out == {n: [(1, n)] * 4 for n in keys}  # one tick per timed call; the counter grew by n
    assert log[:3] == list(keys)  # the warm-up
    runs = [log[i : i + 3] for i in range(3, len(log), 3)]
    assert len(runs) == 4 * len(keys) and all(run == [run[0]] * 3 for run in runs)  # 2 untimed, then the timed


def test_tiles_times_each_variant_and_restores_the_constants(capsys):
    pytest.importorskip("torch", reason="the tiles benchmark times torch alongside")
    import noxton.functional._attention as attention
    import noxton.functional._blockwise as blockwise
    from benchmarks import tiles

    names = ("BLOCK_SCORES", "MAX_BLOCK_Q", "MAX_BLOCK_K", "CHUNK_SCORES", "CHUNK_SCORES_VJP")
    names += ("NORMALISE_AFTER", "NORMALISED_FIRST", "MAX_BEFORE_SCALE", *blockwise.CHUNK_RULES_OFF)
    names += (*blockwise.AVX512_RULES_OFF, "ONE_CHUNK_SCORES_VJP")
    before = {n: getattr(blockwise, n) for n in names}
    rows, packed = attention.CPU_WEIGHT_FIRST_ROWS, attention._packed_in_projection
    argv = ["1,16,2", "16", "fwd_bwd", "10:8:8", "--chunk-scores", "9,12", "--weight-first-rows", "0,256"]
    argv += ["--chunk-rule", "former,rule", "--in-projection", "packed,rule", "--row-max", "after,before"]
    argv += ["--avx512-rules", "off,rule", "--set", "ONE_CHUNK_SCORES_VJP=0;ONE_CHUNK_SCORES_VJP=2**21,MAX_BLOCK_Q=8"]
    argv[-1] += ";CPU_WEIGHT_FIRST_ROWS=0,MAX_BEFORE_SCALE=False"  # a constant of _attention's beside _blockwise's
    tiles.main([*argv, "--normalise", "before,after,rule", "--peers", "torch", "--reps", "1", "--settle", "1"])
    out = capsys.readouterr().out
    assert "B=1 E=16 H=2 L=S=16 fwd_bwd, medians of 1, each after 1 untimed call(s) of its own" in out
    assert "auto ONE_CHUNK_SCORES_VJP=0 " in out and "auto ONE_CHUNK_SCORES_VJP=2097152, MAX_BLOCK_Q=8 " in out
    assert "blockwise 10:8:8 -> (8, 8)" in out
    assert "blockwise CHUNK_SCORES_VJP=2**9 " in out and "blockwise CHUNK_SCORES_VJP=2**12 " in out
    assert "auto CPU_WEIGHT_FIRST_ROWS=0 " in out and "auto CPU_WEIGHT_FIRST_ROWS=256 " in out
    assert all(f"auto normalised {how} " in out for how in ("before", "after", "rule"))
    assert all(f"auto chunk rule {how} " in out for how in ("former", "rule"))
    assert all(f"auto in-projection {how} " in out for how in ("packed", "rule"))
    assert all(f"auto AVX-512 rules {how} " in out for how in ("off", "rule"))
    assert all(f"auto row maximum {how} the scale " in out for how in ("after", "before"))
    assert "auto CPU_WEIGHT_FIRST_ROWS=0, MAX_BEFORE_SCALE=False " in out
    assert {n: getattr(blockwise, n) for n in names} == before and attention.CPU_WEIGHT_FIRST_ROWS == rows
    assert attention._packed_in_projection is packed
    dense_chunk = attention.DENSE_CHUNK_SCORES
    tiles.main(["1,16,2", "16", "fwd_w", "--set", "DENSE_CHUNK_SCORES=2**40;DENSE_CHUNK_SCORES=64", "--reps", "1"])
    out = capsys.readouterr().out  # the forward with need_weights=True, in one block and in blocks of queries
    assert "B=1 E=16 H=2 L=S=16 fwd_w, medians of 1" in out
    assert "auto DENSE_CHUNK_SCORES=1099511627776 " in out and "auto DENSE_CHUNK_SCORES=64 " in out
    assert attention.DENSE_CHUNK_SCORES == dense_chunk
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd"])  # no variant to time
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd", "--normalise", "sideways"])
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd", "--row-max", "during"])
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd", "--avx512-rules", "on"])
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd", "--in-projection", "split"])
    for bad in ("NO_SUCH_CONSTANT=1", "MAX_BLOCK_Q", "MAX_BLOCK_Q=big", "MAX_BLOCK_Q=2**x", "_packed_in_projection=1"):
        with pytest.raises(SystemExit):
            tiles.main(["1,16,2", "16", "fwd", "--set", bad])
    with pytest.raises(SystemExit):
        tiles.main(["1,16,2", "16", "fwd", "--set", "MAX_BLOCK_Q=8", "--settle", "-1"])


def test_a_run_past_its_deadline_writes_its_page_with_the_rest_marked_not_run(tmp_path):
    for module in ("torch", "flax", "matplotlib"):
        pytest.importorskip(module, reason=f"the benchmark needs {module} (the torch and bench extras)")
    page = tmp_path / "performance.md"
    # --gpu-issue's tables (squeeze-excitation, the grid and long sequences in two dtypes), none started
    cmd = [sys.executable, "-m", "benchmarks", "--gpu-issue", "--deadline-s", "0"]
    cmd += ["--out", str(tmp_path / "results"), "--page", str(page)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = page.read_text()
    assert "| (1, 64, 56, 56) | 16 | - | - | - | - | - | - |" in text and "Not run (dashes): 6 of the shapes" in text
    for dtype in ("float32", "bfloat16"):
        grid = text.split(f"## The grid: self-attention, need_weights=False, {dtype}")[1]
        assert "Not run: 4 of the grid's points (fwd B=8 E/H=512/8 L=512, fwd B=4 E/H=1024/16 L=4096, " in grid
    # two dtypes x three contenders x (two forward lengths + one forward+backward: that stops at 16384), but for
    # eqx.nn's forward at 131072, whose scores are over the memory budget: that reason is given first
    assert text.count("not run: the run's --deadline-s 0") == 2 * 3 * (2 + 1) - 2
    assert text.count("| fwd | eqx.nn.MultiheadAttention | 131072 | - | - | - | - | not run: est. ") == 2
    figures = json.loads((tmp_path / "results" / "results.json").read_text())
    assert figures["se"] == [] and figures["grid"] == [] and figures["long"] == []
    assert figures["deadline_s"] == 0 and len(figures["not_run"]) == 6 + 2 * 4 + 16


def test_deadline_defaults():
    from benchmarks.__main__ import parse_args

    assert parse_args([]).deadline_s is None
    assert parse_args(["--gpu-issue"]).deadline_s == 540
    assert parse_args(["--gpu-issue", "--deadline-s", "30"]).deadline_s == 30


def test_long_sequences_stop_at_the_deadline(monkeypatch):
    """Each process is given at most the time left; one stopped there, and those after it, are marked as such."""
    import benchmarks.__main__ as bench

    args = bench.parse_args(["--sizes", "1024,2048", "--long-contenders", "torch,noxton_eqx", "--deadline-s", "100"])
    timeouts = []

    def long_run(name, mode, L, reps, timeout_s):  # each run takes 60 s of the run's clock
        timeouts.append(timeout_s)
        args.started_at -= 60
        if timeout_s < 60:
            return {"skipped": f"timeout > {timeout_s:g} s", "timed_out": True}
        return dict(name=name, mode=mode, L=L, dtype="float32", median_s=1.0, peak_gib=1.0, base_gib=0.5)

    monkeypatch.setattr(bench, "long_run", long_run)
    results = {"long": []}
    table = bench.long_table(args, results)
    assert [pytest.approx(t, abs=1) for t in timeouts] == [100, 40]  # torch, then noxton at L=1024, forward
    assert [(r["name"], r["L"]) for r in results["long"]] == [("torch", 1024)]
    assert table.count("stopped at the run's --deadline-s 100") == 1  # noxton at 1024, not a slow contender
    assert table.count("not run: the run's --deadline-s 100") == 2 + 4  # forward at 2048; forward+backward
    assert results["deadline_s"] == 100 and len(results["not_run"]) == 1 + 6


def test_grid_starts_no_point_that_the_longest_so_far_would_carry_past_the_deadline(monkeypatch):
    import benchmarks.__main__ as bench
    from benchmarks import grid

    argv = ["--grid-points", "1,16,16,2;1,32,16,2", "--grid-contenders", "noxton_eqx", "--deadline-s", "100"]
    args = bench.parse_args(argv)

    def build(name, B, L, E, H, mode):
        def call():  # its first call compiles: 30 s of the run's clock for each of torch and noxton
            args.started_at -= 30

        return call

    monkeypatch.setattr(grid, "build", build)
    monkeypatch.setattr(grid, "medians", lambda calls, reps, **how: dict.fromkeys(calls, 1e-3))
    monkeypatch.setattr(grid, "reset_device_peak", lambda name: None)  # no torch needed (the lowest env has none)
    monkeypatch.setattr(grid, "device_peak_gib", lambda name: None)
    results = {"grid": []}
    table = grid.grid_table(args, results)
    # the first point took 60 s; 40 s were left, so the next three were not started
    assert [(p["mode"], p["L"]) for p in results["grid"]] == [("fwd", 16)]
    assert "Not run: 3 of the grid's points (fwd B=1 E/H=16/2 L=32, fwd_bwd B=1 E/H=16/2 L=16, " in table
    assert len(results["not_run"]) == 3


def test_products_times_each_library_alone_and_says_how_many_cores_it_kept_busy(capsys):
    pytest.importorskip("torch", reason="the products benchmark times torch alongside")
    from benchmarks import products

    products.main(["--shapes", "8,16,48;4,8,8", "--reps", "3"])
    out = capsys.readouterr().out
    assert "Products x @ W.T, float32, medians of 3 calls, each library alone;" in out
    assert "| M x K x N | MFLOP | XLA ms | XLA CPU / wall | torch ms | torch CPU / wall | XLA / torch |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 8 x 16 x 48 |", "| 4 x 8 x 8 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[4]) > 0 and float(cells[3]) > 0 and float(cells[5]) > 0
    # pinned to one CPU (in a process of its own: the pin would outlive the call)
    cmd = [sys.executable, "-m", "benchmarks.products", "--one-core", "--shapes", "8,16,48", "--reps", "3"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "; 1 core(s) (pinned);" in result.stdout and "| 8 x 16 x 48 | 0.0123 |" in result.stdout


def test_products_rejects_a_shape_that_is_not_three_positive_sizes_and_no_timed_calls(capsys):
    from benchmarks import products

    with pytest.raises(SystemExit, match=r"--shapes: expected positive M,K,N triples separated by ';'; got '8,16'"):
        products.main(["--shapes", "8,16"])
    with pytest.raises(SystemExit, match=r"got '0,16,4'"):
        products.main(["--shapes", "4,4,4;0,16,4"])
    with pytest.raises(SystemExit, match=r"got '4,x,4'"):
        products.main(["--shapes", "4,x,4"])
    with pytest.raises(SystemExit) as exit_:  # argparse's error: usage and the message on stderr
        products.main(["--reps", "0"])
    assert exit_.value.code == 2 and "--reps: expected at least 1 timed call; got 0" in capsys.readouterr().err


def test_precision_scope_asks_for_full_float32_off_the_cpu_only(monkeypatch):
    import jax

    from benchmarks import contenders

    def inside(dtype):
        with contenders.precision_scope(dtype):
            return jax.config.jax_default_matmul_precision

    assert inside("float32") is None  # the CPU: JAX's default, which is float32 there
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert inside("float32") == "highest"
    assert inside("bfloat16") is None
