"""The local Ray that `pidec run --engine ray` starts keeps its idle workers: the process that ran
one task is still there for the next, even when actors hold every CPU (as the decoding actors
do), so a write task does not start a fresh Python worker beside them. Without --ray-address,
a cluster Ray finds by itself (RAY_ADDRESS, `ray start` on this machine) is joined as it is."""

import os
import time

import pytest

from pidec.bulk import ray as bulk_ray

try:
    import ray
except ImportError:  # the fake-Ray tests run without it
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install '.[ray]'")

IDLE_WAIT_S = 3.0  # Ray's default kills a worker idle for 1 s (checked every 200 ms) once over its limit


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def task_worker_survives_an_idle_wait(env_threshold: str | None, patience_s: float = 0.0) -> bool:
    """Whether the worker process that ran a task is still alive after sitting idle IDLE_WAIT_S
    (and up to patience_s more, checked twice a second), on a 2-CPU local Ray started by
    `ray_session` with both CPUs held by actors; `env_threshold` sets Ray's idle threshold in the
    environment as a user would."""
    key = f"RAY_{bulk_ray.IDLE_KILL}"
    saved = os.environ.pop(key, None)
    if env_threshold is not None:
        os.environ[key] = env_threshold
    try:
        assert not ray.is_initialized()
        with bulk_ray.ray_session(ray, None, num_cpus=2, _node_ip_address="127.0.0.1", configure_logging=False):

            @ray.remote(num_cpus=1)
            class Holder:
                def pid(self):
                    return os.getpid()

            @ray.remote(num_cpus=0)
            def pid():
                return os.getpid()

            holders = [Holder.remote() for _ in range(2)]
            actor_pids = set(ray.get([h.pid.remote() for h in holders]))
            worker = ray.get(pid.remote())
            assert worker not in actor_pids and alive(worker)
            time.sleep(IDLE_WAIT_S)
            deadline = time.monotonic() + patience_s
            while alive(worker) and time.monotonic() < deadline:  # a busy machine reaps it later
                time.sleep(0.5)
            return alive(worker)
    finally:
        os.environ.pop(key, None)
        if saved is not None:
            os.environ[key] = saved


@pytest.mark.slow
@needs_ray
def test_local_ray_keeps_the_idle_worker_for_the_next_task():
    assert task_worker_survives_an_idle_wait(None)


@pytest.mark.slow
@needs_ray
def test_a_threshold_in_the_environment_wins(monkeypatch):
    key = f"RAY_{bulk_ray.IDLE_KILL}"
    monkeypatch.delenv(key, raising=False)
    assert bulk_ray.local_system_config() == {bulk_ray.IDLE_KILL: bulk_ray.KEEP_IDLE_WORKERS_MS}
    monkeypatch.setenv(key, "1000")
    assert bulk_ray.local_system_config() == {}
    monkeypatch.delenv(key)
    assert not task_worker_survives_an_idle_wait("1000", patience_s=10)  # Ray's own default: the idle worker goes


class FakeRay:
    """Records `init` calls; joining an existing cluster refuses _system_config as Ray does."""

    def __init__(self, found_cluster: bool, error: str | None = None):
        self.found_cluster, self.error, self.calls, self.shut = found_cluster, error, [], False

    def is_initialized(self):
        return False

    def init(self, **kw):
        self.calls.append(kw)
        if self.error:
            raise ValueError(self.error)
        if self.found_cluster and kw.get("_system_config"):
            raise ValueError("When connecting to an existing cluster, _system_config must not be provided.")

    def shutdown(self):
        self.shut = True


def test_without_an_address_a_cluster_ray_finds_is_joined_as_it_is(monkeypatch):
    monkeypatch.delenv(f"RAY_{bulk_ray.IDLE_KILL}", raising=False)
    fake = FakeRay(found_cluster=False)
    with bulk_ray.ray_session(fake, None) as workers_have_env:
        assert workers_have_env  # started here: its workers have the environment given
    assert [c.get("_system_config") for c in fake.calls] == [{bulk_ray.IDLE_KILL: bulk_ray.KEEP_IDLE_WORKERS_MS}]
    assert fake.shut

    fake = FakeRay(found_cluster=True)
    with bulk_ray.ray_session(fake, None) as workers_have_env:
        assert not workers_have_env
    assert [c.get("_system_config") for c in fake.calls] == [{bulk_ray.IDLE_KILL: bulk_ray.KEEP_IDLE_WORKERS_MS}, None]

    fake = FakeRay(found_cluster=False)
    with bulk_ray.ray_session(fake, "10.0.0.1:6379") as workers_have_env:  # --ray-address: the cluster's own settings
        assert not workers_have_env
    assert fake.calls == [{"address": "10.0.0.1:6379", "include_dashboard": False, "log_to_driver": False}]

    fake = FakeRay(found_cluster=False, error="Invalid address format: x")
    with pytest.raises(ValueError, match="Invalid address"), bulk_ray.ray_session(fake, None):
        pass
    assert len(fake.calls) == 1


def fake_ray_with_monitor(head: bool, process) -> object:
    """Just what `stop_autoscaler_monitor` reads of Ray: the node this process started (head) or
    joined, listing `process` as its autoscaler monitor."""
    from types import SimpleNamespace as NS

    node = NS(head=head, all_processes={"monitor": [NS(process=process)]})
    return NS(_private=NS(worker=NS(_global_node=node), ray_constants=NS(PROCESS_TYPE_MONITOR="monitor")))


def test_the_monitor_is_killed_only_on_a_node_started_here():
    import subprocess
    import sys

    for head in (False, True):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert bulk_ray.stop_autoscaler_monitor(fake_ray_with_monitor(head, p)) is head
            assert (p.poll() is not None) is head
        finally:
            p.kill()
            p.wait()
    assert bulk_ray.stop_autoscaler_monitor(FakeRay(found_cluster=False)) is False  # not Ray's layout: nothing


@pytest.mark.slow
@needs_ray
def test_local_ray_gives_its_workers_the_env_and_stops_its_monitor_first(monkeypatch):
    """A local Ray's workers start with `worker_env` (a variable the user set wins), which the
    driver's environment has only while Ray starts; Ray's own shutdown stops the GCS before the
    autoscaler monitor, whose handler then waits on it: the monitor goes first."""
    assert not ray.is_initialized()
    monkeypatch.delenv("PIDEC_TEST_NEW", raising=False)
    monkeypatch.setenv("PIDEC_TEST_SET", "user's")
    seen = {}
    shutdown = ray.shutdown

    def spy():
        node = ray._private.worker._global_node
        (info,) = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_MONITOR]
        seen["monitor exited"] = info.process.poll() is not None
        shutdown()

    monkeypatch.setattr(ray, "shutdown", spy)
    env = {"PIDEC_TEST_NEW": "1", "PIDEC_TEST_SET": "ours"}
    with bulk_ray.ray_session(
        ray, None, worker_env=env, num_cpus=1, _node_ip_address="127.0.0.1", configure_logging=False
    ) as workers_have_env:
        assert workers_have_env

        @ray.remote(num_cpus=0)
        def worker_env():
            return [os.environ.get(k) for k in ("PIDEC_TEST_NEW", "PIDEC_TEST_SET", bulk_ray.NICENESS)]

        assert ray.get(worker_env.remote()) == ["1", "user's", "0"]
        assert "PIDEC_TEST_NEW" not in os.environ and os.environ["PIDEC_TEST_SET"] == "user's"
        node = ray._private.worker._global_node
        (info,) = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_MONITOR]
        assert info.process.poll() is None  # running until the end
    assert seen["monitor exited"]
    assert not ray.is_initialized()
