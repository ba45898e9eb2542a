"""Reading a simulator run's timing from its logs (fedharmony.study.simulator_timing), by hand."""

import threading

import pytest

from fedharmony.study.simulator_timing import aggregation_times, round_times, rss_sampler, site_task_times


def test_round_times_are_the_gaps_between_aggregations(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("2026-12-07 10:00:00,000 - INFO - round 0: aggregated 2 site updates\n"
                   "2026-12-07 10:00:05,500 - INFO - something else\n"
                   "2026-12-07 10:00:07,250 - INFO - round 1: aggregated 2 site updates\n"
                   "2026-12-07 10:00:17,250 - INFO - round 2: aggregated 2 site updates\n")
    stamps = aggregation_times(log)
    assert sorted(stamps) == [0, 1, 2] and stamps[1] - stamps[0] == pytest.approx(7.25)
    assert round_times(log) == pytest.approx({1: 7.25, 2: 10.0})


def test_site_task_times_keep_the_slowest_site_of_each_round(tmp_path):
    for site, times in (("site-1", (3.5, 4.0)), ("site-2", (5.25, 2.0))):
        (tmp_path / site).mkdir()
        (tmp_path / site / "log.txt").write_text("".join(
            f"2026-12-07 10:00:0{r},000 - BundleExecutor - INFO - {site} round {r}: global val_mean_dice 0.5000, "
            f"12 local steps, task {t:.2f} s (validation 1.0 s)\n" for r, t in enumerate(times)))  # the executor's line
    assert site_task_times(tmp_path) == {0: 5.25, 1: 4.0}


def test_the_rss_sampler_stops_when_told():
    stop, peaks = threading.Event(), {}
    stop.set()
    rss_sampler(stop, peaks)  # returns at once, having sampled nothing
    assert peaks == {}


def test_peak_rss_records_its_own_site_process_only_while_the_block_runs():
    import subprocess
    import sys

    from fedharmony.study.simulator_timing import SAMPLER_THREAD_NAME, peak_rss

    sleeper = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    # a server-like process that is not this process's child (another run on the machine): started through a
    # shell that exits at once, so that it is re-parented away from this process
    subprocess.run(["sh", "-c", " ".join(sleeper[:2] + ["'import time; time.sleep(4)'", "nvflare simulator &"])],
                   check=True)
    # a process whose command line says what a simulator site process says, run by this process
    with peak_rss() as peaks:
        subprocess.run([*sleeper, "simulator_worker"], check=True)
    assert peaks.get("client", 0) > 1
    assert "server" not in peaks  # the orphaned "nvflare simulator" ran all along but is not this run's
    with pytest.raises(RuntimeError, match="the run failed"):  # an error in the block ends the sampling too
        with peak_rss():
            raise RuntimeError("the run failed")
    # other tests in the same worker may leave threads of their own; only the samplers must be gone
    assert not [t for t in threading.enumerate() if t.name == SAMPLER_THREAD_NAME]


def test_process_tree_follows_children_from_the_root():
    from fedharmony.study.simulator_timing import _process_tree

    table = {1: (0, 10, "init"), 5: (1, 10, "me"), 6: (5, 10, "child"), 7: (6, 10, "grandchild"),
             8: (1, 10, "someone else"), 9: (8, 10, "their child")}
    assert _process_tree(table, 5) == {5, 6, 7}
