"""Scale-out: one process group for a command, and the watcher that ends every rank on a failure."""
