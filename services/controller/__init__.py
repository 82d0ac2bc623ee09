"""The center's system controller: site registry, zero-touch onboarding, heartbeats, availability.

Decisions are pure functions (`tokens`, `availability`, `selection`); `service` moves events.
"""
