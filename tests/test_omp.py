"""One OpenMP team per worker process (shared/runtime/omp.py): the compute thread's."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (a thread's OpenMP team lives as long as the thread): a worker's threads, set up
# as EngineService sets them up, each run a tensor op big enough for a parallel region; then the
# kernel's names of the process's threads (OpenMP's threads begin with their master's name).
SCRIPT = textwrap.dedent("""
    import json, os
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from shared.runtime.engine_service import compute_pool
    from shared.runtime.omp import serial_pool, serial_thread

    def names():
        return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

    def region():  # 16M elements: a parallel region on every thread the caller may use
        return float((torch.ones(4096, 4096) * 2).sum())

    compute = compute_pool(2)
    serial_thread()  # the event loop's thread
    out = {"main_threads": torch.get_num_threads()}
    out["compute_threads"] = compute.submit(torch.get_num_threads).result()
    out["before"] = names()
    compute.submit(region).result()
    out["after_compute"] = names()
    region()
    helpers = serial_pool(1)  # held: a pool's threads end with it
    helpers.submit(region).result()
    out["after_serial"] = names()
    plain = ThreadPoolExecutor(1)  # a plain thread: a team of its own
    plain.submit(region).result()
    out["after_plain"] = names()
    print(json.dumps(out))
""")


def test_only_the_compute_thread_starts_an_openmp_team():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    main = Path("/proc/self/comm").read_text().strip()  # the child runs the same executable
    assert out["main_threads"] == 1 and out["compute_threads"] == 2
    # the compute thread's team: one thread more, named for it
    assert grown(out["before"], out["after_compute"]) == ["compute"], out
    # the main thread and a serial helper ran the same op on themselves: one thread more (the helper)
    assert grown(out["after_compute"], out["after_serial"]) == ["serial"], out
    # the control: a plain thread starts a team (itself and one more), so the counts above could fail
    assert grown(out["after_serial"], out["after_plain"]) == [main, main], out


def grown(before: list[str], after: list[str]) -> list[str]:
    """The names of the threads `after` holds beyond `before`."""
    rest = list(after)
    for name in before:
        rest.remove(name)
    return sorted(rest)


def test_bench_omp_times_each_layout_in_a_process_of_its_own(tiny_fp32, tmp_path):
    """loadgen.bench_omp on `tiny`: every layout decodes its steps; only `two-teams` holds a second
    team (one thread more than `compute`, whose one more than `main` is the compute thread)."""
    from loadgen import bench_omp

    out = tmp_path / "omp.json"
    r = bench_omp.main(["--model", str(tiny_fp32), "--rows", "3", "--output-len", "5", "--rounds", "1",
                        "--dtype", "fp32", "--moe-backend", "grouped", "--threads", "2", "--out", str(out)])
    runs = {layout: rs[0] for layout, rs in r["runs"].items()}
    assert list(runs) == ["main", "compute", "two-teams"]
    assert all(run["steps"] == 4 and run["median_step_ms"] > 0 for run in runs.values())
    threads = [runs[layout]["process_threads"] for layout in ("main", "compute", "two-teams")]
    assert threads[1] == threads[0] + 1 and threads[2] == threads[1] + 1, runs
    assert json.loads(out.read_text())["two_teams_over_compute"] > 0
