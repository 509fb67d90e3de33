"""Time-sharing of device memory between the trainer and the engine, as explicit transitions.

The order is the contract (the step calls these in this order):
    after rollout:   engine_sleep()  then  train_wake()
    after training:  train_sleep()   then  engine_wake_weights(), <load weights>, engine_wake_kv()
The engine must never wake while the trainer holds its memory, and weights must be awake before they are
loaded (loading into sleeping memory fails on Ascend). On CPU there is nothing to share: every transition is a
no-op, said once in the log.
"""

from __future__ import annotations

import logging

from .device import Accelerator

logger = logging.getLogger(__name__)


class MemoryManager:
    def __init__(self, acc: Accelerator, engine) -> None:
        self.acc, self.engine = acc, engine
        if not acc.has_device_memory:
            logger.info("device memory time-sharing: off on CPU (sleep/wake transitions are no-ops)")

    def engine_sleep(self) -> None:
        if self.acc.has_device_memory:
            self.engine.sleep()

    def train_wake(self) -> None:
        pass  # torch_memory_saver resume: lands with the memory time-sharing work (accelerators only)

    def train_sleep(self) -> None:
        pass  # torch_memory_saver pause: lands with the memory time-sharing work (accelerators only)

    def engine_wake_weights(self) -> None:
        if self.acc.has_device_memory:
            self.engine.wake_up(tags=["weights"])

    def engine_wake_kv(self) -> None:
        if self.acc.has_device_memory:
            self.engine.wake_up(tags=["kv_cache"])
