"""Local status of an edge site: answered by the agent itself, with or without the center.

`responder` serves `local.<site>.status` with a `SiteStatusReport`.
"""
