"""Real traffic per endpoint from Envoy's admin counters (pure)."""

from __future__ import annotations

from typing import Any

from control_plane.prober.traffic import TrafficTracker, parse_cluster_active
from control_plane.runtime.envoy_admin import EnvoyHost, parse_clusters

# The shape Envoy 1.40 answers /clusters?format=json with (uint64 as strings, zeros left out).
CLUSTERS: dict[str, Any] = {
    "cluster_statuses": [
        {"name": "chat", "host_statuses": [
            {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8001}},
             "hostname": "a", "weight": 16,
             "health_status": {"eds_health_status": "HEALTHY"},
             "stats": [{"name": "cx_connect_fail"}, {"value": "7", "name": "rq_success",
                                                    "type": "COUNTER"},
                       {"value": "2", "name": "rq_active", "type": "GAUGE"}]},
            {"hostname": "b", "stats": [{"name": "rq_success"}]},
        ]},
        {"name": "other.pool", "added_via_api": True},
    ]
}


def test_parse_clusters_and_active_gauges() -> None:
    assert parse_clusters(CLUSTERS) == [
        EnvoyHost("chat", "a", "127.0.0.1", 8001, "healthy", 16, 2, 0, 7),
        EnvoyHost("chat", "b", "", 0, "healthy", 1, 0, 0, 0)]
    assert parse_clusters({}) == []
    stats = {"stats": [{"name": "cluster.chat.upstream_rq_active", "value": 3},
                       {"name": "cluster.other.pool.upstream_rq_active", "value": 0},
                       {"name": "cluster.chat.upstream_rq_active_overflow", "value": 9}]}
    assert parse_cluster_active(stats) == {"chat": 3, "other.pool": 0}


def hc(host: str, success: int, active: int = 0, cluster: str = "p") -> EnvoyHost:
    return EnvoyHost(cluster, host, "", 0, "healthy", 1, active, 0, success)


def test_connection_failures_are_seen_until_it_answers_without_one() -> None:
    t = TrafficTracker()

    def failed(n: int, success: int) -> EnvoyHost:
        return EnvoyHost("p", "a", "", 0, "healthy", 1, 0, 0, success, n)

    t.observe("e", 100.0, [failed(3, 5)])  # a baseline: failures before we looked
    assert t.connect_failed_at("p", "a") is None
    t.observe("e", 101.0, [failed(4, 9)])  # answers and a failure: it may be dying
    assert t.connect_failed_at("p", "a") == 101.0
    t.observe("e", 102.0, [failed(4, 9)])  # nothing new
    assert t.connect_failed_at("p", "a") == 101.0
    t.observe("f", 102.5, [failed(1, 0)])  # another Envoy's baseline changes nothing
    t.observe("e", 103.0, [failed(4, 12)])  # answers, no failure: cleared for this Envoy
    assert t.connect_failed_at("p", "a") is None
    t.observe("f", 104.0, [failed(2, 0)])
    assert t.connect_failed_at("p", "a") == 104.0


def test_first_poll_is_a_baseline() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 50), hc("b", 3, active=1)])
    assert t.last_traffic("p", "a") is None  # counted before we looked: says nothing
    assert t.busy("p", "b") and t.last_traffic("p", "b") == 100.0


def test_success_counter_increase_is_traffic() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 5)])
    t.observe("e", 101.0, [hc("a", 5)])
    assert not t.served_within("p", "a", 10.0, 101.0)
    t.observe("e", 102.0, [hc("a", 6)])
    assert t.last_traffic("p", "a") == 102.0
    assert t.served_within("p", "a", 10.0, 111.9)
    assert not t.served_within("p", "a", 10.0, 112.0)
    assert not t.busy("p", "a")


def test_in_flight_request_is_busy_and_traffic() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 0)])
    t.observe("e", 101.0, [hc("a", 0, active=1)])
    assert t.busy("p", "a") and t.served_within("p", "a", 0.001, 101.0)
    t.observe("e", 105.0, [hc("a", 1, active=0)])
    assert not t.busy("p", "a") and t.last_traffic("p", "a") == 105.0


def test_failed_requests_to_a_dead_host_are_not_traffic() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("dead", 4)])
    # Envoy counts connect failures in rq_error / cx_connect_fail, not in rq_success.
    t.observe("e", 101.0, [hc("dead", 4)])
    assert t.last_traffic("p", "dead") is None


def test_counter_reset_with_new_traffic_counts() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 40)])
    t.observe("e", 101.0, [hc("a", 2)])  # cluster rebuilt by a CDS update, then 2 answers
    assert t.last_traffic("p", "a") == 101.0
    t.observe("e", 102.0, [hc("b", 9)])
    t.observe("e", 103.0, [hc("b", 0)])  # reset without traffic since
    assert t.last_traffic("p", "b") is None


def test_requests_hidden_by_a_cluster_rebuild_keep_their_host_busy() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 10, active=2), hc("b", 5)], {"p": 2})
    # CDS update: new host objects with zero counters; the two streams still run on the
    # old ones, which only the cluster-wide gauge still counts.
    t.observe("e", 101.0, [hc("a", 0), hc("b", 0)], {"p": 2})
    assert t.busy("p", "a") and not t.busy("p", "b")
    t.observe("e", 102.0, [hc("a", 0), hc("b", 0)], {"p": 1})
    assert t.busy("p", "a")
    t.observe("e", 103.0, [hc("a", 0), hc("b", 0)], {"p": 0})
    assert not t.busy("p", "a")
    assert t.last_traffic("p", "a") == 102.0
    t.observe("e", 104.0, [hc("a", 0), hc("b", 0)], {"p": 0})
    assert not t.busy("p", "a")


def test_several_envoys_any_busy_latest_traffic() -> None:
    t = TrafficTracker()
    t.observe("e1", 100.0, [hc("a", 1)])
    t.observe("e2", 100.0, [hc("a", 1)])
    t.observe("e1", 101.0, [hc("a", 2)])
    t.observe("e2", 103.0, [hc("a", 1, active=1)])
    assert t.busy("p", "a") and t.last_traffic("p", "a") == 103.0
    t.forget("e2")
    assert not t.busy("p", "a") and t.last_traffic("p", "a") == 101.0


def test_hosts_are_per_pool() -> None:
    t = TrafficTracker()
    t.observe("e", 100.0, [hc("a", 1, cluster="p1"), hc("a", 1, cluster="p2")])
    t.observe("e", 101.0, [hc("a", 2, cluster="p1"), hc("a", 1, cluster="p2")])
    assert t.last_traffic("p1", "a") == 101.0
    assert t.last_traffic("p2", "a") is None
    assert t.last_traffic("p3", "a") is None and not t.busy("p3", "a")
