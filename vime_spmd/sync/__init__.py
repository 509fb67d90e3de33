"""Weight sync from the trainer's shards into the engine: the plan and its driver (weight_sync), the records the
two sides exchange (weights), and the shared-memory transport within a node (shm)."""
