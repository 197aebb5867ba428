"""dlrl: distributed RL for diffusion language models (shared core)."""

import os

# Ray clusters started with `ray start` require an auth token; Ray reads this switch once, when it
# is imported, so it is set before any dlrl module imports ray. A user's own setting wins.
os.environ.setdefault("RAY_AUTH_MODE", "token")
