"""Device ingest at the edge: raw MQTT messages become versioned `DeviceReading` events.

`convert` is the pure decision; `worker` moves messages; `bridge` reads an external broker.
"""
