"""How evenly `pidec run --engine ray` spreads one large input file over many actors: Ray's own
read blocks against blocks of about one actor call (`pidec.bulk.ray.block_bytes`).

Actors that sleep 20 ms per record stand in for the model, so the figure is Ray Data's
scheduling alone and many actors fit on a small machine (each asks for 0.2 CPU). Prints, for
each way of reading, the busy time of each actor and the makespan (first call's start to last
call's end) against the ideal (the total sleep over the actors).

    PYTHONPATH=src python scripts/ray_balance.py bs64/corpus-4096-512.jsonl --actors 10 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import time


class Sleeper:
    """A Ray Data actor: sleeps SLEEP_S per record and says which process ran the call, when."""

    SLEEP_S = 0.02

    def __call__(self, table):
        import pyarrow as pa

        start = time.time()
        time.sleep(self.SLEEP_S * table.num_rows)
        n = table.num_rows
        return pa.table({"pid": [os.getpid()] * n, "start": [start] * n, "end": [time.time()] * n})


def one_run(ray, path: str, actors: int, blocks: str) -> str:
    from pidec.bulk import ray as pray

    shards = pray.find_shards(path, None)
    records = pray.count_input_records(shards)
    rows = pray.share_per_call(shards, actors, None, total=records)
    settings = pray.data_settings(shards, records, rows)  # what `pidec run` reads with
    if blocks == "ray":
        del settings["target_max_block_size"]
    compute = ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1)
    with pray.data_context(**settings):
        ds = pray.read(shards).map_batches(
            Sleeper, batch_size=rows, batch_format="pyarrow", compute=compute, num_cpus=0.2
        )
        out = ds.take_all()
    calls: dict[int, set] = {}
    for r in out:
        calls.setdefault(r["pid"], set()).add((r["start"], r["end"]))
    busy = [sum(e - s for s, e in c) for c in calls.values()]
    span = max(e for c in calls.values() for _, e in c) - min(s for c in calls.values() for s, _ in c)
    ideal = Sleeper.SLEEP_S * records / actors
    return (
        f"{blocks:>4} blocks: calls of {rows}, {len(calls)} actors used, busy {min(busy):.1f}-{max(busy):.1f} s "
        f"each, makespan {span:.1f} s (ideal {ideal:.1f} s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="one JSONL file (or a folder of shards)")
    p.add_argument("--actors", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    import ray

    for _ in range(a.rounds):
        for blocks in ("ray", "call"):
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            try:
                print(one_run(ray, a.input, a.actors, blocks), flush=True)
            finally:
                ray.shutdown()


if __name__ == "__main__":
    main()
