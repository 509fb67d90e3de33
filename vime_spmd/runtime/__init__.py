"""What every rank needs around the loop: the accelerator (device), time-sharing device memory (memory), stop
signals, the hang watchdog, failure reporting between ranks, and the launch environment."""
