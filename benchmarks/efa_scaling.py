"""Cost of one EFA block: the linear-cost Lebedev/ERoPE form vs the exact O(N^2) pairwise form.

What is timed: forward plus backward of one EuclideanFastAttention block (features 64, 8 frequency
pairs so D = 16, Dv = 16, 50-point grid, b_max = pi), float32, on N random atoms in a cube at
0.1 atoms/A^3, with r_max set to the cube's diagonal. The backward pass computes the gradient of
sum(y) with respect to both the positions and the input features (as in a force evaluation, where
the features depend on the positions through the local layers).

What "peak memory" means: every case runs in a fresh Python process; after the inputs and the block
exist, the process reads its peak resident set size (getrusage ru_maxrss), then runs the timed
forward+backward passes and reads it again. The difference is the extra resident memory the
computation needed at its peak: activations saved for backward, temporaries, gradients and the
allocator's caching, not the inputs, not Python/torch themselves. It has the granularity of the OS
(so small cases read near 0) and is an upper bound on the tensors alive at any moment.

Usage:  python benchmarks/efa_scaling.py            (all cases, about 4 minutes on 2 busy cores)
        python benchmarks/efa_scaling.py --sizes 100 1000 --threads 1
Writes benchmarks/results/efa_scaling.md (tables), .json (raw numbers) and .png (plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
THREADS = [1, 2]
FORMS = ["lebedev", "exact"]
DENSITY = 0.1  # atoms per cubic Angstrom, liquid-like
FEATURES, NUM_FREQUENCIES, VALUE_DIM, GRID_POINTS = 64, 8, 16, 50
MEMORY_LIMIT = 8e9  # bytes: skip a case predicted to need more
SLOW_LIMIT = 20.0  # seconds: after a size takes longer than this, skip the larger sizes
CASE_TIMEOUT = 150.0  # seconds: a case still running then is killed and reported as such
MIN_REPEATS, MIN_SECONDS, MAX_REPEATS = 3, 1.0, 20


# ---------------------------------------------------------------------------------------------
# one case, in its own process


def run_case(form: str, n: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from efa_deploy.model import EuclideanFastAttention

    edge = (n / DENSITY) ** (1.0 / 3.0)
    r_max = edge * math.sqrt(3.0)
    torch.manual_seed(0)
    block = EuclideanFastAttention(
        FEATURES, num_frequencies=NUM_FREQUENCIES, value_dim=VALUE_DIM, grid_points=GRID_POINTS,
        r_max=r_max, b_max=math.pi,
    ).float()
    block.exact = form == "exact"
    positions = (torch.rand(n, 3) * edge).requires_grad_(True)
    x = torch.randn(n, FEATURES).requires_grad_(True)
    vec = torch.zeros(n, 3, FEATURES)  # no vector channels: the block does not read it
    batch = torch.zeros(n, dtype=torch.long)
    owned = torch.ones(n)

    def step() -> None:
        y = block(x, vec, positions, batch, 1, owned)
        torch.autograd.grad(y.sum(), [positions, x])

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (also the memory peak)
    times = repeat_timed(step)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "form": form, "n": n, "threads": threads, "edge": edge, "r_max": r_max,
        "median_s": times[len(times) // 2], "min_s": times[0], "repeats": len(times),
        "peak_bytes": max(rss_after - rss_before, 0),
    }


def repeat_timed(step) -> list[float]:
    """Sorted wall times of step(): at least MIN_REPEATS runs and MIN_SECONDS, at most MAX_REPEATS;
    once a run is slow (SLOW_LIMIT / 4), no more."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_REPEATS and (len(times) < MIN_REPEATS or time.perf_counter() - start < MIN_SECONDS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if times[-1] > SLOW_LIMIT / 4:  # slow case: a single timed run after the warm-up is enough
            break
    return sorted(times)


def run_in_subprocess(form: str, n: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--case", form, str(n), str(threads)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"form": form, "n": n, "threads": threads, "status": f"timeout (> {CASE_TIMEOUT:.0f} s)"}
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"form": form, "n": n, "threads": threads, "status": f"failed: {reason}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


# ---------------------------------------------------------------------------------------------
# the sweep


def available_memory() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return MEMORY_LIMIT


def predicted_bytes(previous: dict | None, form: str, n: int) -> float:
    """The larger of an analytic lower bound (the big float32 tensors each form materialises) and the
    last measured peak scaled by N (Lebedev) or N^2 (exact)."""
    m = NUM_FREQUENCIES
    if form == "lebedev":  # angles, cos, sin (N G M each), rotated queries and keys (N G 2M each)
        bound = 7.0 * n * GRID_POINTS * m * 4
    else:  # distances (N^2), q.k, sinc kernel and their product (N^2 M each)
        bound = (1.0 + 3.0 * m) * n * n * 4
    if previous is None or previous.get("status") != "ok" or previous["peak_bytes"] < 50e6:
        return bound  # nothing measured that rises above the OS page granularity
    power = 1 if form == "lebedev" else 2
    return max(bound, previous["peak_bytes"] * (n / previous["n"]) ** power)


def sweep(sizes: list[int], threads_list: list[int]) -> list[dict]:
    memory_limit = min(MEMORY_LIMIT, 0.6 * available_memory())
    results = []
    for threads in threads_list:
        for form in FORMS:
            previous = None
            for n in sizes:
                predicted = predicted_bytes(previous, form, n)
                if predicted > memory_limit:
                    result = {"form": form, "n": n, "threads": threads,
                              "status": f"skipped (predicted {predicted / 1e9:.0f} GB)"}
                elif previous is not None and previous.get("status", "").startswith(("skipped", "timeout")):
                    result = {"form": form, "n": n, "threads": threads, "status": "skipped"}
                elif previous is not None and previous.get("median_s", 0) > SLOW_LIMIT:
                    result = {"form": form, "n": n, "threads": threads,
                              "status": f"skipped (N={previous['n']} took {previous['median_s']:.0f} s)"}
                else:
                    result = run_in_subprocess(form, n, threads)
                print(describe(result), flush=True)
                results.append(result)
                previous = result
    return results


def describe(r: dict) -> str:
    head = f"{r['form']:8s} N={r['n']:>6d} threads={r['threads']}"
    if r.get("status") != "ok":
        return f"{head}  {r['status']}"
    return (f"{head}  {r['median_s'] * 1e3:10.2f} ms  ({r['median_s'] / r['n'] * 1e6:8.2f} us/atom, "
            f"{r['repeats']} runs)  peak +{r['peak_bytes'] / 1e6:.0f} MB")


# ---------------------------------------------------------------------------------------------
# reporting


def lookup(results: list[dict], form: str, n: int, threads: int) -> dict | None:
    for r in results:
        if r["form"] == form and r["n"] == n and r["threads"] == threads:
            return r
    return None


def crossover(results: list[dict], sizes: list[int], threads: int) -> str:
    """Smallest N where Lebedev beats pairwise, interpolated log-log between measured sizes."""
    pairs = []
    for n in sizes:
        a, b = lookup(results, "lebedev", n, threads), lookup(results, "exact", n, threads)
        if a and b and a.get("status") == "ok" and b.get("status") == "ok":
            pairs.append((n, b["median_s"] / a["median_s"]))  # > 1: Lebedev faster
    if not pairs:
        return "not measured"
    if pairs[0][1] > 1:
        return f"below {pairs[0][0]} (Lebedev already {pairs[0][1]:.1f}x faster at N={pairs[0][0]})"
    for (n0, s0), (n1, s1) in zip(pairs, pairs[1:]):
        if s0 <= 1 < s1:
            t = (0 - math.log(s0)) / (math.log(s1) - math.log(s0))
            return f"about {math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))):.0f} (between {n0} and {n1})"
    return f"above {pairs[-1][0]} (pairwise still faster)"


def largest_common(results: list[dict], sizes: list[int], threads: int) -> str:
    for n in reversed(sizes):
        a, b = lookup(results, "lebedev", n, threads), lookup(results, "exact", n, threads)
        if a and b and a.get("status") == "ok" and b.get("status") == "ok":
            return f"N={n}: pairwise {b['median_s'] * 1e3:.1f} ms, Lebedev {a['median_s'] * 1e3:.1f} ms, ratio {b['median_s'] / a['median_s']:.1f}x"
    return "none"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(load_at_start: tuple) -> list[str]:
    import torch

    load_at_end = os.getloadavg()
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average (1/5/15 min) at the start "
        f"{' / '.join(f'{v:.2f}' for v in load_at_start)}, at the end {' / '.join(f'{v:.2f}' for v in load_at_end)}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]
    if load_at_start[0] > 0.5 * (os.cpu_count() or 1):  # the end value includes this sweep's own load
        lines.append("- WARNING: other processes were using the CPU during this run; its timings (above all the "
                     "2-thread ones, whose threads wait for each other) are not representative")
    return lines


def cell(r: dict | None, what: str) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r["status"]
    if what == "ms":
        return f"{r['median_s'] * 1e3:.2f}"
    if what == "us":
        return f"{r['median_s'] / r['n'] * 1e6:.2f}"
    return f"{r['peak_bytes'] / 1e6:.0f}"


def markdown(results: list[dict], sizes: list[int], threads_list: list[int], elapsed: float, load_at_start: tuple) -> str:
    lines = [
        "# EFA block: Lebedev (linear) vs exact pairwise (O(N^2)) form",
        "",
        f"One `EuclideanFastAttention` block, features {FEATURES}, D = {2 * NUM_FREQUENCIES}, Dv = {VALUE_DIM}, "
        f"{GRID_POINTS}-point grid, b_max = pi, float32; N random atoms in a cube at {DENSITY} atoms/A^3, "
        "r_max = cube diagonal. Time: median wall time of forward + backward (gradient of sum(y) with respect "
        "to positions and input features), after one warm-up run. Peak memory: growth of the process's peak "
        "resident set (ru_maxrss) during those runs, in a fresh process per case (excludes inputs and the "
        "Python/torch baseline; includes allocator caching; ~0 reads mean below the OS granularity).",
        "",
        "## Time (ms)",
        "",
        "| N | edge (A) | r_max (A) | " + " | ".join(f"{f} {t} thr" for t in threads_list for f in FORMS)
        + " | " + " | ".join(f"pairwise/Lebedev {t} thr" for t in threads_list) + " |",
        "|" + "---|" * (3 + len(FORMS) * len(threads_list) + len(threads_list)),
    ]
    for n in sizes:
        edge = (n / DENSITY) ** (1 / 3)
        row = [f"{n}", f"{edge:.1f}", f"{edge * math.sqrt(3):.1f}"]
        row += [cell(lookup(results, f, n, t), "ms") for t in threads_list for f in FORMS]
        for t in threads_list:
            a, b = lookup(results, "lebedev", n, t), lookup(results, "exact", n, t)
            ok = a and b and a.get("status") == "ok" and b.get("status") == "ok"
            row.append(f"{b['median_s'] / a['median_s']:.2f}" if ok else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Time per atom (us) and peak memory growth (MB)",
        "",
        "| N | " + " | ".join(f"{f} {t} thr us/atom" for t in threads_list for f in FORMS)
        + " | " + " | ".join(f"{f} {t} thr MB" for t in threads_list for f in FORMS) + " |",
        "|" + "---|" * (1 + 2 * len(FORMS) * len(threads_list)),
    ]
    for n in sizes:
        row = [f"{n}"]
        row += [cell(lookup(results, f, n, t), "us") for t in threads_list for f in FORMS]
        row += [cell(lookup(results, f, n, t), "mb") for t in threads_list for f in FORMS]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Summary", ""]
    for t in threads_list:
        lines.append(f"- {t} thread(s): crossover N {crossover(results, sizes, t)}; "
                     f"largest N both forms ran: {largest_common(results, sizes, t)}")
    lines += ["", "## Machine", ""] + machine_info(load_at_start) + [f"- whole sweep: {elapsed:.0f} s", ""]
    return "\n".join(lines)


def plot(results: list[dict], threads_list: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_atom) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"lebedev": ("tab:blue", "Lebedev (linear)"), "exact": ("tab:red", "exact pairwise")}
    for form in FORMS:
        color, label = styles[form]
        for t in threads_list:
            done = sorted((r for r in results if r["form"] == form and r["threads"] == t and r.get("status") == "ok"),
                          key=lambda r: r["n"])
            if not done:
                continue
            n = [r["n"] for r in done]
            seconds = [r["median_s"] for r in done]
            style = dict(color=color, marker="o" if t == 1 else "s", linestyle="-" if t == 1 else "--",
                         label=f"{label}, {t} thread{'s' if t > 1 else ''}")
            ax_time.plot(n, seconds, **style)
            ax_atom.plot(n, [s / k * 1e6 for s, k in zip(seconds, n)], **style)
    ax_time.set(xscale="log", yscale="log", xlabel="atoms N", ylabel="forward + backward time (s)",
                title="one EFA block, float32")
    ax_atom.set(xscale="log", yscale="log", xlabel="atoms N", ylabel="time per atom (us)", title="time per atom")
    for ax in (ax_time, ax_atom):
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--threads", type=int, nargs="+", default=THREADS)
    parser.add_argument("--case", nargs=3, metavar=("FORM", "N", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .png results")
    args = parser.parse_args()
    if args.case:
        form, n, threads = args.case
        print(json.dumps(run_case(form, int(n), int(threads))))
        return
    start, load_at_start = time.perf_counter(), os.getloadavg()
    results = sweep(sorted(args.sizes), args.threads)
    report = markdown(results, sorted(args.sizes), args.threads, time.perf_counter() - start, load_at_start)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efa_scaling.md").write_text(report)
    (args.out / "efa_scaling.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.threads, args.out / "efa_scaling.png")
    print(f"wrote efa_scaling.md, .json and .png in {args.out}")


if __name__ == "__main__":
    main()
