"""The registry of model families: one line per family, and the lookups generic code uses.

A family is one module here that builds a `Family` record (family.py says what a record holds);
registering it is one line in FAMILIES. Everything else — loading, the forward, special ids,
LoRA, per-block sharding and `dlrl plan` — finds a checkpoint's record through `family_of` and
reads its fields; nothing outside this package compares a `model_type`.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PretrainedConfig

from dlrl.models.families import dream, llada, sdar, tiny
from dlrl.models.families.family import REMOTE, Family

FAMILIES: tuple[Family, ...] = (
    tiny.FAMILY,
    llada.FAMILY,
    dream.FAMILY,
    sdar.FAMILY,
)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_ARCHITECTURE = {a: f for f in FAMILIES for a in f.architectures}
if len(_BY_MODEL_TYPE) != sum(len(f.model_types) for f in FAMILIES) or (
    len(_BY_ARCHITECTURE) != sum(len(f.architectures) for f in FAMILIES)
):
    raise ValueError("two registered families answer to the same model_type or architecture")


def registered(config: PretrainedConfig | Mapping | None) -> Family | None:
    """The registered family of a config (object or config.json dict), or None.

    By `model_type`, then by `architectures` (a config.json may name only its class)."""
    if config is None:
        return None
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    family = _BY_MODEL_TYPE.get(get("model_type") or "")
    if family is not None:
        return family
    return next((_BY_ARCHITECTURE[a] for a in get("architectures") or () if a in _BY_ARCHITECTURE), None)


def family_of(config: PretrainedConfig | Mapping | None) -> Family:
    """The family record of a config (object or config.json dict): registered, else REMOTE."""
    return registered(config) or REMOTE


def model_family(model: object) -> Family:
    """The family record of a model, looking through a peft wrapper to the config underneath."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    return family_of(getattr(inner, "config", None))


__all__ = ["FAMILIES", "REMOTE", "Family", "family_of", "model_family", "registered"]
