"""edgebus messaging layer: NATS servers, links and transport helpers."""
