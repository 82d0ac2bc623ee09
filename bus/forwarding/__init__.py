"""The parts of the replay-log forwarder that are plain data or pure decisions, plus its puller.

`bus.forwarder.Forwarder` is the loop that uses them (and re-exports their public names).
"""
