"""Where the work runs: device, precision, compile, CPU threads, torchrun (DDP, FSDP2)."""
