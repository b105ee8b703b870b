"""`pidec run --engine ray` on a local Ray started by the test (2 CPUs, loopback only) gives the
records of the single-process run, in the same order."""

import os

import pytest

from pidec.bulk import ray as bulk_ray
from pidec.bulk import runner
from pidec.bulk.extract import Options
from pidec.bulk.fields import questions
from pidec.bulk.workers import ModelSpec
from pidec.bulk.writers import read_output

from ..shared_data import tiny_checkpoint
from .corpus import FIELDS, records, write_jsonl, write_parquet

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = pytest.mark.slow


def kind_only(record: dict) -> dict:
    return record | {"error": record["error"]["kind"]} if "error" in record else record


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault(bulk_ray.NICENESS, "0")  # as `pidec run --engine ray` does for a local Ray
    for attempt in range(3):  # Ray gives its raylet 30 s to start: a busy machine can miss that
        try:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
            )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def test_ray_engine_matches_the_single_process_run(local_ray, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=7, max_input_length=40, eos_boost=2.0)
    rows = records(30)
    rows[4] = {"id": "empty", "document": " "}
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    with jsonl.open("a") as f:
        f.write("{broken\n")
    spec, q, opts = ModelSpec(str(ckpt)), questions(fields=FIELDS), Options(max_new_tokens=4, batch_tokens=64)
    local = runner.run(spec, jsonl, tmp_path / "local.jsonl", q, opts, display="off", window=8)
    want = read_output(tmp_path / "local.jsonl")

    s = bulk_ray.run(spec, jsonl, tmp_path / "ray-out", q, opts, actors=2, actor_cpus=1)
    assert len(list((tmp_path / "ray-out").glob("*.json"))) == 1  # fewer records than FILE_ROWS: one file
    got = read_output(tmp_path / "ray-out")
    bulk_ray.run(spec, jsonl, tmp_path / "ray-files", q, opts, actors=2, actor_cpus=1, file_rows=8)
    assert len(list((tmp_path / "ray-files").glob("*.json"))) > 1
    assert read_output(tmp_path / "ray-files") == got  # the order kept across files
    malformed = [r for r in got if r.get("error", {}).get("kind") == "malformed_line"]
    assert len(malformed) == 1 and malformed[0]["error"]["message"].startswith(f"{jsonl}: invalid JSON")
    # the answers are the same; error messages name the file, but Ray gives no line numbers
    assert [kind_only(r) for r in got] == [kind_only(r) for r in want]
    assert all(r["error"]["message"].startswith(str(jsonl)) for r in got if "error" in r)
    assert [r.get("id") for r in got] == [r.get("id") for r in want]  # same order
    assert s["records"] == local["records"] == 31 and s["errors_by_kind"] == local["errors_by_kind"]
    assert s["malloc"] == "--malloc keep, applied in each actor"

    pq = write_parquet(tmp_path / "in.parquet", records(12))
    runner.run(spec, pq, tmp_path / "local.parquet", q, opts, display="off", window=8)
    bulk_ray.run(spec, pq, tmp_path / "ray-pq", q, opts, output_format="parquet", actors=1, batch_size=8)
    assert read_output(tmp_path / "ray-pq") == read_output(tmp_path / "local.parquet")


def test_extract_is_a_ray_dataset_of_output_records(local_ray, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=7, max_input_length=40, eos_boost=2.0)
    ds = ray.data.from_items(records(6))
    out = bulk_ray.extract(ds, model=str(ckpt), prompts=["hotel area"], max_new_tokens=3, actors=1, batch_size=4)
    rows = sorted(out.take_all(), key=lambda r: int(r["id"].split("-")[1]))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(6)]
    assert all(len(r["answers"]) == 1 and r["error"] is None for r in rows)


def test_run_cuts_actor_calls_so_a_small_corpus_reaches_every_actor(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for k in range(3):
        write_jsonl(folder / f"part-{k}.jsonl", records(10))
    shards = bulk_ray.find_shards(folder, None)
    # an eighth of each actor's share, but at least a batch's worth (batch_tokens / 512 documents)
    # unless that is more than the actor's whole share
    assert bulk_ray.share_per_call(shards, actors=2, limit=None, batch_tokens=512) == 2  # 30 / (8 x 2), rounded up
    assert bulk_ray.share_per_call(shards, actors=2, limit=None, batch_tokens=4096) == 8  # one batch of 8
    assert bulk_ray.share_per_call(shards, actors=2, limit=None) == 15  # 16 a batch, 15 each actor's share
    assert bulk_ray.share_per_call(shards, actors=1, limit=3) == 3
    assert bulk_ray.share_per_call(shards, actors=1, limit=3, batch_tokens=512) == 1
    big = write_jsonl(tmp_path / "big.jsonl", records(5000))
    assert bulk_ray.share_per_call(bulk_ray.find_shards(big, None), actors=2, limit=None) == bulk_ray.MAX_BATCH_SIZE


def block_rows(table):
    """A map_batches function that is given whole blocks (batch_size=None): each block's length."""
    return {"rows": [table.num_rows]}


def test_run_reads_a_file_in_blocks_of_about_one_call(local_ray, tmp_path):
    """An actor takes a whole input block at a time: `run` has Ray read in blocks of about one
    call's records, so one large file still spreads over every actor in small pieces."""
    one = write_jsonl(tmp_path / "one.jsonl", records(4000))
    shards = bulk_ray.find_shards(one, None)
    rows = bulk_ray.share_per_call(shards, actors=10, limit=None, batch_tokens=512)
    assert rows == 50  # 4000 / (8 calls x 10 actors)
    settings = bulk_ray.data_settings(shards, 4000, rows)  # what `run` reads with

    def blocks(**settings) -> list[int]:
        with bulk_ray.data_context(**settings):
            ds = bulk_ray.read(shards).map_batches(block_rows, batch_size=None, batch_format="pyarrow", num_cpus=0)
            return [r["rows"] for r in ds.take_all()]

    ray_own, sized = blocks(**{"execution_options.preserve_order": True}), blocks(**settings)
    assert sum(ray_own) == sum(sized) == 4000
    assert max(ray_own) > 4 * rows  # Ray's own blocks: far more than a call (the test is not empty)
    assert max(sized) <= 2 * rows and len(sized) >= 4000 // (2 * rows)


def test_data_context_puts_the_settings_back():
    ctx = ray.data.DataContext.get_current()
    size, order = ctx.target_max_block_size, ctx.execution_options.preserve_order
    with bulk_ray.data_context(target_max_block_size=1234, **{"execution_options.preserve_order": not order}):
        assert ctx.target_max_block_size == 1234 and ctx.execution_options.preserve_order is (not order)
    assert ctx.target_max_block_size == size and ctx.execution_options.preserve_order == order


def test_block_bytes_is_a_call_of_the_input_files_bytes(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", records(100))
    shards = bulk_ray.find_shards(one, None)
    assert bulk_ray.block_bytes(shards, 100, 10) == one.stat().st_size // 10
    assert bulk_ray.block_bytes(shards, 0, 10) is None
    assert bulk_ray.data_settings(shards, 100, 10) == {
        "execution_options.preserve_order": True,
        "target_max_block_size": one.stat().st_size // 10,
    }
    assert bulk_ray.data_settings(shards, 0, 10) == {"execution_options.preserve_order": True}
    ray_own = ray.data.DataContext.get_current().target_max_block_size
    assert bulk_ray.data_settings(shards, 1, ray_own)["target_max_block_size"] == ray_own  # never larger


def test_run_reads_and_writes_with_one_task_per_eight_actors():
    """Each Ray read or write task runs in a worker process of its own: `run` does not start one
    per input shard (8 shards on 2 actors used to start 8 reader processes on a 2-core machine)."""
    assert [bulk_ray.readers_for(n) for n in (1, 2, 8, 9, 16, 17)] == [1, 1, 1, 2, 2, 3]


def test_actors_start_with_one_malloc_heap_unless_their_workers_have_it(monkeypatch):
    for name in (*bulk_ray.allocator.USER_MALLOC_VARIABLES, bulk_ray.allocator.ARENA_MAX_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bulk_ray.allocator, "_libc", lambda: object())
    spec = ModelSpec("ckpt")
    one_heap = {"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "1"}}}
    assert bulk_ray.actor_options(spec, 1, None) == {"num_cpus": 1, "num_gpus": None} | one_heap
    assert bulk_ray.actor_options(spec, 1, None, env={}) == {"num_cpus": 1, "num_gpus": None}
    assert bulk_ray.actor_env(ModelSpec("ckpt", malloc="default")) == {}
    assert bulk_ray.actor_env(ModelSpec("ckpt", device="cuda")) == {}
    assert bulk_ray.actor_env(spec, gpus=1) == {}  # `run` with --actor-gpus: its local Ray's workers
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the user's
    assert bulk_ray.actor_options(spec, 0, 1) == {"num_cpus": 0, "num_gpus": 1}
