"""The edge half of zero-touch onboarding: a bootstrap token in, a persisted site identity out.

`client.onboard` talks to the center once; `identity` keeps the result in `identity.json`.
"""

from edge_agent.onboarding.client import (
    CenterUnreachable,
    OnboardingError,
    OnboardingRefused,
    RetryPolicy,
    onboard,
)
from edge_agent.onboarding.identity import (
    IDENTITY_FILE,
    IdentityError,
    SiteIdentityRecord,
    load_identity,
    save_identity,
)

__all__ = [
    "IDENTITY_FILE",
    "CenterUnreachable",
    "IdentityError",
    "OnboardingError",
    "OnboardingRefused",
    "RetryPolicy",
    "SiteIdentityRecord",
    "load_identity",
    "onboard",
    "save_identity",
]
