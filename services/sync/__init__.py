"""Config sync, center half: layered desired config in KV, pushed per site, status per site."""
