"""An example experiment suite: experiments written as pytest tests, with the ms2m plugin.

The plugin gives a session-wide testbed (``ms2m_testbed``) and a freshly deployed service per
test (``ms2m_service``, parameters from the ``ms2m`` marker). Assert on what must hold (the
invariants, the protocol's promises); record the figures, do not assert them: timings vary
with the machine. ``record_property`` puts them into pytest's JUnit XML (``--junitxml``).
"""

import time

import pytest

import ms2m


@pytest.mark.ms2m(processing_ms=50, state_bytes=1_000_000)
@pytest.mark.parametrize("strategy", ["ms2m", "ms2m_cutoff", "stop_and_copy"])
def test_migration_keeps_every_message_and_the_state(
    ms2m_testbed, ms2m_service, strategy, record_property
):
    with ms2m_testbed.workload(ms2m_service, rate=10):
        time.sleep(1.5)
        report = ms2m_testbed.migrate(ms2m_service, to="edge-2", strategy=strategy, settle_s=0.5)
    report.assert_valid()
    assert report.lost == 0 and report.duplicated == 0 and report.state_consistent
    record_property("downtime_ms", report.downtime_ms)
    record_property("total_ms", report.total_ms)


@pytest.mark.ms2m(processing_ms=50, state_bytes=10_000)
def test_cutoff_bounds_the_replay_near_capacity(ms2m_testbed, ms2m_service, record_property):
    # Above the capacity of 20 msg/s the target can never draw level, so the cutoff must fire;
    # at 20 exactly, whether it does is a race.
    with ms2m_testbed.workload(ms2m_service, rate=25):
        time.sleep(1.5)
        report = ms2m_testbed.migrate(
            ms2m_service, to="cloud", strategy="ms2m_cutoff", replay_max_s=1.0, settle_s=0.3
        )
    report.assert_valid()
    cutoff = report.to_dict()["migration"]["cutoff"]
    assert cutoff["fired"], cutoff
    assert cutoff["t_cutoff_s"] == pytest.approx(
        cutoff["replay_max_s"] * cutoff["mu"] / cutoff["lambda"]
    )
    record_property("t_cutoff_s", cutoff["t_cutoff_s"])


@pytest.mark.ms2m(processing_ms=20, state_bytes=10_000)
def test_a_crashed_target_leaves_the_source_serving(ms2m_testbed, ms2m_service):
    with ms2m_testbed.workload(ms2m_service, rate=20):
        time.sleep(1.0)
        with pytest.raises(ms2m.MigrationFailed) as failed:
            ms2m_testbed.migrate(
                ms2m_service,
                to="edge-2",
                fault=ms2m.Fault(kill="target", at_phase="replay"),
                settle_s=0.3,
            )
    report = failed.value.report
    assert not report.completed
    report.assert_valid()
    assert ms2m_testbed.service(ms2m_service.name).host == ms2m_service.host
