//! grok-worker: a process that owns one shard of one model replica.
