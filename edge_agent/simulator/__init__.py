"""Site simulator: many virtual sites in one process, speaking the real site protocol.

How the center is measured at scale and how the demo shows a large fleet. Each virtual site
onboards with its own bootstrap token (`sites.add`, then `OnboardRequest`) and heartbeats
(`SiteHeartbeat` on `up.<site>.heartbeat`, inventory from the agent's `inventory_from`)
and answers config pushes (`ConfigDesired` validated against its kind, `ConfigReport` back;
no periodic reports); later protocols (alarms, usage) join here as they land.

What differs from a real site, and only this: the virtual sites share a few NATS
connections under ONE simulator identity that is allowed to speak for all of them. On a
center without auth any connection may; on a center with auth the simulator connects with a
service credential (`CredentialAuthority.issue_service_credentials("edgebus-simulator")`),
which may publish on every site's `up.<site>.>` subjects and call the controller. In
production that identity would be a dedicated "simulator" user limited to `up.*.>`,
`ctl.controller.onboard` and `ctl.controller.sites.{add,query}`, never a site's credential.
The per-site credentials the controller issues at onboarding are therefore not used, the
token's bootstrap credentials and center URLs neither; virtual sites run no ingest and keep
no replay log (they represent the protocol to the center, not a site's data path).
"""

from edge_agent.simulator.config import SimulatorConfig
from edge_agent.simulator.fleet import BlastResult, FleetStats, Gate, SimulatedFleet
from edge_agent.simulator.onboarding import OnboardSummary
from edge_agent.simulator.plan import BeatSchedule, site_ids

__all__ = [
    "BeatSchedule",
    "BlastResult",
    "FleetStats",
    "Gate",
    "OnboardSummary",
    "SimulatedFleet",
    "SimulatorConfig",
    "site_ids",
]
