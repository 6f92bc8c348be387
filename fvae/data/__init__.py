"""Data: the synthetic market, qlib import/export, the shard format and the day loader."""
