"""Built-in drivers, one module each, found by module name (see offload.device)."""
