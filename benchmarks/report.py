"""Reporting: Markdown tables, the machine, the plot, and the documentation page written from a run."""

from __future__ import annotations

import json
import os
import platform
import shutil

from benchmarks.contenders import THREADS, label
from benchmarks.measure import LONG_B, LONG_E, LONG_H


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def device() -> str:
    """The devices the contenders run on: JAX's default device, and torch's."""
    import jax
    import torch

    from benchmarks.contenders import torch_device

    d = jax.devices()[0]
    jax_dev = f"JAX on {d.platform.upper()} ({d.device_kind})"
    torch_dev = "torch on CPU"
    if torch_device() == "cuda":
        torch_dev = f"torch on CUDA ({torch.cuda.get_device_name(0)})"
    return f"{jax_dev}, {torch_dev}"


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` with its architecture and, where it has it, AVX-512 (the CPU
    rules of ``noxton.functional._blockwise`` differ by vendor and by AVX-512), or the architecture alone where
    that file is not there."""
    from noxton.functional._blockwise import cpu_info, has_avx512

    arch = platform.processor() or platform.machine()
    arch += ", AVX-512" if has_avx512() else ""
    model = cpu_info("model name")
    return f"{model} ({arch})" if model else arch


def machine() -> str:
    import jax
    import torch

    return (
        f"{device()}; {cpu_name()}, {THREADS} CPU cores, Python {platform.python_version()}, jax {jax.__version__}, "
        f"torch {torch.__version__} with `torch.set_num_threads({THREADS})` (XLA's CPU client uses every core)"
    )


def plot(long_results: list[dict], path: str) -> None:
    """Time and peak memory against sequence length, log-log, one line per contender, mode and dtype (peak device
    memory on an accelerator, else the process's peak RSS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    on_device = any(r.get("device_peak_gib") is not None for r in long_results)
    memory = "device_peak_gib" if on_device else "peak_gib"
    dtypes = sorted({r.get("dtype", "float32") for r in long_results})
    series: dict[tuple[str, str, str], list[dict]] = {}
    for r in long_results:
        series.setdefault((r["name"], r["mode"], r.get("dtype", "float32")), []).append(r)
    for (name, mode, dtype), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["L"])
        tag = f"{mode}, {dtype}" if len(dtypes) > 1 else mode
        for ax, field in zip(axes, ("median_s", memory), strict=True):
            shown = [r for r in rs if r.get(field) is not None]  # a contender on the CPU has no device peak
            ax.plot(
                [r["L"] for r in shown],
                [r[field] for r in shown],
                "-" if mode == "fwd" else "--",
                marker="o" if dtype == dtypes[0] else "s",
                label=f"{label(name)} [{tag}]",
            )
    ylabels = ("median time (s)", "peak device memory (GiB)" if on_device else "peak RSS (GiB)")
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L = S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    where = device() if on_device else f"{THREADS} CPU threads"
    fig.suptitle(f"MHA, E={LONG_E}, H={LONG_H}, batch {LONG_B}; {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PAGE_INTRO = """\
# Performance

This page is written by the benchmark (`benchmarks/`) from one run; nothing on it is edited by hand.
To reproduce it:

```bash
pip install -e ".[torch,bench]"   # torch (CPU), flax, matplotlib
{command}
```

It times noxton's Equinox and Haiku front ends (jitted) side by side, in one process and with the
repeats interleaved, against `torch.nn.MultiheadAttention` (eval + `no_grad`; train mode for
forward+backward), `eqx.nn.MultiheadAttention`, `hk.MultiHeadAttention`,
`flax.nnx.MultiHeadAttention`, `jax.nn.dot_product_attention` and a matmul-only lower bound (the same
matrix products, no softmax, no masking); then a grid of batch sizes, widths and sequence lengths,
forward and forward+backward, with a heat map of noxton's `auto` against the fastest peer at each
point; then long sequences, one process per length and contender,
with that process's peak resident memory. Dense contenders are not started where their score matrices
would exceed the memory budget (`--mem-budget-gib`). Which attention path `implementation="auto"`
takes is described in the [API reference](api/functional.md). It also times the compilation of
Transformer stacks against their depth. torch and the JAX peers run in the process that imported
noxton, and so with the glibc `malloc` settings that `import noxton` makes
([Differences](differences.md#the-processs-allocator)); the long-sequence rows' processes too.

The same command runs on a CUDA machine: JAX takes its default device, torch takes CUDA when it sees it,
every call waits for its device, the tables add each contender's peak device memory, and the run names
its devices below. `python -m benchmarks --gpu-issue` runs the GPU issue's sizes (B=8, L=512, E=512, H=8
and B=4, L=4096, E=1024, H=16; long sequences at 16384 and 131072) in float32 and bfloat16, with fewer
contenders, sized to take about 10 minutes; after 540 s (`--deadline-s`) it starts no further point or
process and writes the page with what it measured, the rest marked not run. On a GPU, float32 is full
float32 in every library (JAX's contenders compile under `jax.default_matmul_precision("highest")`,
since JAX's default there is TensorFloat-32; torch's TF32 stays off), and JAX allocates device memory as
it goes rather than taking most of it at start.
"""


#: Sections a run of ``python -m benchmarks`` keeps, as they stand on the page it replaces, after its own:
#: the figures of a run on a GPU (gathered from the benchmark's output there), and the decoding
#: benchmark's (``python -m benchmarks.decoding --page``).
KEPT_SECTIONS = ("## On a GPU", "## Decoding with a key/value cache")


def section(text: str, heading: str) -> str | None:
    """The section of the Markdown ``text`` that starts with the line ``heading``, to the next ``## `` heading."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == heading]
    if not starts:
        return None
    end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[starts[0] : end]).strip()


def splice(page: str, heading: str, body: str) -> None:
    """Write the section ``heading`` + ``body`` into ``page``: in place of that section, or at its end."""
    text = ""
    if os.path.exists(page):
        with open(page) as f:
            text = f.read()
    new = f"{heading}\n\n{body.strip()}"
    old = section(text, heading)
    text = text.replace(old, new) if old is not None else (text.rstrip() + "\n\n" if text.strip() else "") + new
    with open(page, "w") as f:
        f.write(text.rstrip() + "\n")


def write(out_dir: str, page: str, command: str, conditions: str, sections: list[str], results: dict) -> None:
    """Write ``results.md``, ``results.json`` and the plot to ``out_dir``; the page and its plot next to ``page``."""
    os.makedirs(out_dir, exist_ok=True)
    image = os.path.join(out_dir, "long_sequences.png")
    if results["long"]:
        plot(results["long"], image)
    heat = os.path.join(out_dir, "grid_heatmap.png")
    if results["grid"]:
        from benchmarks.grid import heatmap  # grid imports this module

        heatmap(results["grid"], heat, device())
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n\n".join([conditions, *sections]) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    parts = [PAGE_INTRO.format(command=command).rstrip(), "## The run\n\n" + conditions, *sections]
    if results["grid"]:
        page_heat = os.path.splitext(page)[0] + "_grid.png"
        shutil.copyfile(heat, page_heat)
        at = next(i for i, p in enumerate(parts) if p.startswith("## The grid")) + 1
        parts.insert(at, f"![noxton auto against the fastest peer at each grid point]({os.path.basename(page_heat)})")
    if results["long"]:
        page_image = os.path.splitext(page)[0] + "_long_sequences.png"
        shutil.copyfile(image, page_image)
        parts.append(f"![time and peak memory against sequence length]({os.path.basename(page_image)})")
    if os.path.exists(page):
        with open(page) as f:
            old = f.read()
        parts += [s for s in (section(old, h) for h in KEPT_SECTIONS) if s is not None]
    with open(page, "w") as f:
        f.write("\n\n".join(parts) + "\n")
