"""Coming from comma's miniray: its ``Limits`` names (keywords and a dict, the clear errors for
the rest), ``fmap`` (lazy and bounded), and catching any task failure, against a real server
and real workers."""

import itertools

import pytest

import miniray
import tasks
from miniray import errors
from miniray.client import comma
from support import wait_for

pytestmark = pytest.mark.timeout(60)

COMMA_DEFAULTS = {  # what comma's Limits().asdict() gives
    "cpu_threads": 1, "memory": 1.0, "small_gpu_memory": 0.0, "big_gpu_memory": 0.0,
    "timeout_seconds": 60, "triton": False, "node_whitelist": None,
}


def test_comma_names_as_keywords_and_as_a_dict_mean_miniray_fields():
    want = miniray.Limits(memory_gb=4, cpus=2, timeout_seconds=30, nodes=("gpu1",),
                          triton=True)
    assert miniray.Limits(memory=4, cpu_threads=2, timeout_seconds=30,
                          node_whitelist=["gpu1"], triton=True) == want
    from miniray.client.limits import as_limits

    assert as_limits({"memory": 4, "cpu_threads": 2, "timeout_seconds": 30,
                      "node_whitelist": ["gpu1"], "triton": True}) == want
    # a comma Limits' asdict() as it is: zero GPU memory asks for nothing, None is anywhere
    assert as_limits(COMMA_DEFAULTS) == miniray.Limits(memory_gb=1.0, cpus=1,
                                                       timeout_seconds=60)
    assert as_limits(None) == miniray.Limits()
    # miniray's names and comma's mix; a field given under both names is refused
    assert miniray.Limits(memory=2, gpus=1) == miniray.Limits(memory_gb=2, gpus=1)
    with pytest.raises(errors.ConfigurationError, match="memory_gb is given twice"):
        miniray.Limits(memory=2, memory_gb=2)


@pytest.mark.parametrize("given, says", [
    ({"big_gpu_memory": 8}, r"big_gpu_memory has no miniray equivalent.*gpu_memory_gb=N"),
    ({"small_gpu_memory": 1}, r"small_gpu_memory has no miniray equivalent.*T600"),
    ({"memroy": 2}, r"no such limit; did you mean memory\?"),
    ({"cores": 2}, r"no such limit; miniray's are timeout_seconds, memory_gb, cpus"),
    ({"cpu_threads": 0}, r"Limits\(cpus=0\) must be a positive number"),
])
def test_what_does_not_map_is_refused_saying_what_to_write(given, says):
    with pytest.raises(errors.ConfigurationError, match=says):
        miniray.Limits(**given)
    from miniray.client.limits import as_limits

    with pytest.raises(errors.ConfigurationError, match=says):
        as_limits(given)


def test_executor_refuses_a_bad_limits_before_it_connects():
    # (no server anywhere: the check comes first)
    with pytest.raises(errors.ConfigurationError, match="big_gpu_memory"):
        miniray.Executor(redis_url="redis://127.0.0.1:1", limits={"big_gpu_memory": 4})
    with pytest.raises(errors.ConfigurationError, match="a dict of its fields"):
        miniray.Executor(redis_url="redis://127.0.0.1:1", limits=["memory", 4])


@pytest.mark.parametrize("given, says", [
    ({"use_local_codedir": True}, "drop it: functions travel pickled by value"),
    ({"force_local": True}, r"redis_url=miniray.init\(\).url"),
    ({"redis_host": "redis.comma.internal"}, "redis_url='redis://:PASSWORD@HOST:6379'"),
    ({"jobname": "x"}, "unexpected keyword argument 'jobname'"),
])
def test_comma_executor_keywords_say_what_to_do_instead(given, says):
    with pytest.raises(TypeError, match=says):
        miniray.Executor(redis_url="redis://127.0.0.1:1", **given)


def test_a_comma_limits_dict_reaches_the_tasks_and_any_failure_is_caught(cluster):
    cluster.start_worker("--slots", "2")
    with cluster.executor(limits={**COMMA_DEFAULTS, "timeout_seconds": 1}) as ex:
        assert ex.limits.cpus == 1 and ex.limits.timeout_seconds == 1
        assert len(ex.submit(tasks.where).result(timeout=30)["affinity"]) == 1  # cpu_threads
        futures = {
            "timeout": ex.submit(tasks.sleep_then, 30),
            "crash": ex.submit(tasks.hard_exit, 3),
            "own": ex.submit(tasks.raise_value_error, 3),
            "fine": ex.submit(tasks.identity, 7),
        }
        caught = {}
        for what, f in futures.items():
            try:
                f.result(timeout=30)
            except miniray.TaskError as e:  # miniray's own reasons
                caught[what] = ("miniray", type(e))
            except Exception as e:  # the task's own exception, as itself
                assert isinstance(e.__cause__, miniray.RemoteTraceback)
                caught[what] = ("task", type(e))
        assert caught == {"timeout": ("miniray", miniray.TaskTimeoutError),
                          "crash": ("miniray", miniray.TaskCrashedError),
                          "own": ("task", ValueError)}
        assert [w for w, f in futures.items() if f.exception() is not None] == \
            ["timeout", "crash", "own"]
        assert isinstance(futures["timeout"].exception(), TimeoutError)  # comma's "TimeoutError"


def test_task_error_is_the_base_of_every_task_side_failure():
    for cls in (miniray.TaskTimeoutError, miniray.MemoryLimitError, miniray.TaskCrashedError,
                miniray.WorkerLostError, miniray.JobAbandonedError, miniray.InitializerError):
        assert issubclass(cls, miniray.TaskError) and issubclass(cls, miniray.MinirayError)
    for cls in (miniray.ConfigurationError, miniray.ServerLostError, miniray.JobCancelledError):
        assert not issubclass(cls, miniray.TaskError)
    # the README's table names only classes miniray has
    for target, _why in comma.EXCEPTION_TYPES.values():
        assert target is None or issubclass(getattr(errors, target), errors.MinirayError)


class Counted:
    """An endless input that records how far it was read."""

    def __init__(self):
        self.read = 0

    def __iter__(self):
        for i in itertools.count():
            self.read = i + 1
            yield i


def test_fmap_submits_lazily_with_a_bound(cluster):
    cluster.start_worker()
    items = Counted()
    with cluster.executor() as ex:
        stream = ex.fmap(tasks.identity, iter(items), chunksize=2, buffersize=3)
        # nobody takes the futures: the feeder stops after `bound` chunks wait here (and
        # holds at most one chunk it read and could not submit)
        wait_for(lambda: ex.progress()["done"] >= 6, what="the first chunks to run")
        assert items.read <= (3 + 1) * 2
        got = [f.result(timeout=30) for f in itertools.islice(stream, 20)]
        assert got == list(range(20))
        assert items.read <= 20 + 2 * (3 + 1) * 2
        stream.close()


def test_fmap_without_a_buffersize_is_bounded_too(cluster):
    # map_futures without one would read an endless input forever; fmap has a default bound
    cluster.start_worker()
    items = Counted()
    with cluster.executor() as ex:
        stream = ex.fmap(tasks.identity, iter(items))
        assert [f.result(timeout=30) for f in itertools.islice(stream, 5)] == list(range(5))
        bound = comma.FMAP_BUFFERSIZE
        wait_for(lambda: ex.progress()["done"] >= bound, timeout=40, what="a buffer's worth")
        assert items.read <= 5 + 2 * bound + 1
        stream.close()
