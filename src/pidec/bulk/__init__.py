"""Bulk runs (`pidec run`): a trained model over a whole corpus, streaming and resumable.

One job per module: `readers` (input shards and records), `fields` (what every record is
asked), `extract` (record -> job -> output record, token-budgeted batches, decoding),
`writers` (output shards under a temporary name), `progress` (the progress file and resuming),
`report` (progress bar, log lines, summary), `workers` (this process or N processes),
`runner` (the single-machine loop) and `ray` (the same decoding on Ray Data, optional extra).
"""
