"""The paper's numbers a config is compared with (``config.targets``, ``targets_by``,
``targets_source``): results.md, report.html and tools/reproduce.py show them beside
ours."""

from __future__ import annotations

from kdjax.errors import ConfigError


def _plain_dict(d):
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    return {str(k): _plain_dict(v) if hasattr(v, "items") else v for k, v in d.items()}


def _dotted(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(
                f"targets_by={key!r} is not a config key: it names the key whose value picks "
                "one table of config.targets (e.g. 'efficientad.model_size').")
        node = node[part]
    return node


def paper_targets(config):
    """(targets, source): the paper's numbers this config is compared with,
    {category or "mean": {metric: value in percent}}, or None when it names none; and
    where they come from (``targets_source``, with the ``targets_by`` choice appended).

    With ``targets_by`` set, ``config.targets`` holds one such table per value of that
    key and the table of the key's current value is returned (matched exactly, else
    ignoring case); a value without a table gives None. ConfigError when
    ``targets_by`` is not a key of the config."""
    raw = config.get("targets", None)
    targets = _plain_dict(raw) if raw else {}
    source = str(config.get("targets_source", "") or "")
    by = str(config.get("targets_by", "") or "")
    if by:
        value = str(_dotted(config, by))
        table = targets.get(value)
        if table is None:
            table = next((t for k, t in targets.items() if k.lower() == value.lower()), None)
        targets = table or {}
        source = f"{source} [{by}={value}]" if source else ""
    return (targets or None), source


def paper_categories(targets) -> list:
    """The categories a targets table gives numbers for, in its order ("mean" left out)."""
    return [k for k in (targets or {}) if k != "mean"]
