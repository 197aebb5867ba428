"""learner package of dlrl."""

import dlrl  # noqa: F401  (sets Ray's auth mode before ray is imported)
