"""The pool's size and placement, per node (issue 26): every node that holds workers keeps one
decode task's CPUs free, and a replacement goes only where it fits beside that node's live
workers. Pure rules, checked without Ray; the two-node cluster runs are tests/test_multinode.py."""
from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.job.pool import Pool, worker_plan


def cfg(*overrides: str):
    return load_config(None, ["workers.num_shards=8", *overrides])


def per_node(plan) -> dict[str, int]:
    return {node: plan.nodes.count(node) for node in set(plan.nodes)}


def test_one_local_node_keeps_its_old_size():
    plan = worker_plan(cfg(), {"CPU": 2.0}, shards_left=8, node_cpus={"n1": 2.0})
    assert (plan.size, plan.num_cpus, per_node(plan)) == (3, 0.5, {"n1": 3})
    assert worker_plan(cfg(), {"CPU": 2.0}, shards_left=2, node_cpus={"n1": 2.0}).size == 2
    # no node list (a caller that does not know them): the cluster's CPUs as one node
    assert worker_plan(cfg(), {"CPU": 2.0}, shards_left=8).size == 3


@pytest.mark.parametrize("cpus, expected", [(1.0, {"a": 1, "b": 1}), (2.0, {"a": 3, "b": 3})])
def test_equal_nodes_each_keep_room_for_a_decode_task(cpus, expected):
    plan = worker_plan(cfg(), {"CPU": 2 * cpus}, shards_left=8, node_cpus={"a": cpus, "b": cpus})
    assert per_node(plan) == expected
    for _node, count in per_node(plan).items():
        assert count * plan.num_cpus + 0.5 <= cpus  # the reserve stays free on every node


def test_uneven_nodes_and_a_node_smaller_than_the_reserve():
    plan = worker_plan(cfg(), {"CPU": 5.25}, shards_left=8, node_cpus={"big": 4.0, "one": 1.0, "tiny": 0.25})
    assert per_node(plan) == {"big": 7, "one": 1} and plan.num_cpus == 0.5


def test_more_workers_than_fit_ask_for_less_each_and_never_the_reserve():
    plan = worker_plan(cfg("workers.num_workers=4"), {"CPU": 2.0}, shards_left=8, node_cpus={"a": 1.0, "b": 1.0})
    assert per_node(plan) == {"a": 2, "b": 2} and plan.num_cpus == pytest.approx(0.25)


def _pool(nodes: list[str | None], live: list[bool], num_cpus: float = 0.5) -> Pool:
    pool = object.__new__(Pool)  # the placement rule alone: no actors started
    pool.cfg, pool.num_cpus, pool.nodes = cfg(), num_cpus, list(nodes)
    pool.actors = [object() if alive else None for alive in live]
    return pool


def test_a_replacement_goes_where_it_fits_or_the_slot_retires():
    # two 1-CPU nodes, one worker each; b is lost: a has no room for a second worker beside a decode task
    pool = _pool(["a", "b"], [True, False])
    assert pool._room({"a": 1.0}, avoid="b") is False
    # b is back (or another node joined): the replacement goes there
    assert pool._room({"a": 1.0, "c": 1.0}, avoid="b") == "c"
    # 2-CPU nodes: a has room for one more, and takes it
    assert pool._room({"a": 2.0}, avoid="b") == "a"
    # the last worker always gets a replacement: without one nothing could run
    assert _pool(["a"], [False])._room({"a": 0.25}, avoid="a") is None
