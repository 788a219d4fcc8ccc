"""What every subpackage shares: crash-safe writes and digests (files), the watcher that cleans up
after a killed stage and ends its run (run_guard), logging set-up (logs), progress bars (progress),
and the name -> builder registry the models use (registry)."""
