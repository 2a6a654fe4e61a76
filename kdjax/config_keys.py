"""Config key names: every dotted key of a config, and the closest known keys to an
unknown one (``train.lr`` -> ``train.learning_rate``) for one-line messages."""

from __future__ import annotations

import difflib

import ml_collections

DEPRECATED_KEYS = ("data.val_fraction",)  # still accepted, never suggested


def flat_keys(config, open_sections=(), sections: bool = False) -> list:
    """Dotted names of every value in ``config``; a nested ConfigDict is walked unless its
    dotted name is in ``open_sections`` (then it is one key). ``sections``: also list the
    names of the ConfigDicts walked."""
    out = []

    def walk(d, prefix):
        for k in d.keys():
            path = prefix + str(k)
            v = d[k]
            if isinstance(v, ml_collections.ConfigDict) and path not in open_sections:
                if sections:
                    out.append(path)
                walk(v, path + ".")
            else:
                out.append(path)

    walk(config, "")
    return out


def closest_keys(key: str, known, n: int = 3) -> list:
    """The known dotted keys closest to ``key``: abbreviations (lr -> learning_rate),
    near spellings and prefixes in the same section, then the same name in another section,
    then near spellings of the whole key."""
    known = list(known)
    section, _, leaf = key.rpartition(".")
    leaves = {}
    for k in known:
        s, _, name = k.rpartition(".")
        if s == section:
            leaves.setdefault(name, k)
    out: list = []

    def add(ks):
        for k in ks:
            if k not in out and k != key and not key.startswith(k + "."):
                out.append(k)

    add(leaves[name] for name in leaves
        if len(leaf) >= 2 and "".join(w[:1] for w in name.split("_") if w) == leaf)
    add(leaves[name] for name in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.6))
    add(leaves[name] for name in leaves
        if len(leaf) >= 3 and (name.startswith(leaf) or leaf.startswith(name)))
    add(leaves[name] for name in leaves if _word_prefixes(leaf, name))
    add(k for k in known if k.rpartition(".")[2] == leaf)
    add(k for k in known if len(leaf) >= 2 and "".join(
        w[:1] for w in k.rpartition(".")[2].split("_") if w) == leaf)
    others = [k for k in known if k.rpartition(".")[0] != section]
    add(difflib.get_close_matches(key, others, n=n, cutoff=0.6))
    return [k for k in out if k not in DEPRECATED_KEYS][:n]


def _word_prefixes(short: str, name: str) -> bool:
    """Whether every word of ``short`` starts a word of ``name``, in order (val_frac ->
    validation_fraction)."""
    words, target = [w for w in short.split("_") if w], [w for w in name.split("_") if w]
    if len(words) < 2 or len(words) > len(target):
        return False
    i = 0
    for w in words:
        while i < len(target) and not target[i].startswith(w):
            i += 1
        if i == len(target):
            return False
        i += 1
    return True


def unknown_key_message(key: str, known, how: str = "") -> str:
    """``key`` is not a config key; the closest known keys (or the section's keys). One
    line, without a final full stop."""
    known = list(known)
    close = closest_keys(key, known)
    section = key.rpartition(".")[0]
    if close:
        hint = f"closest known keys: {', '.join(close)}"
    elif section and any(k.startswith(section + ".") for k in known):
        names = [k.rpartition(".")[2] for k in known
                 if k.rpartition(".")[0] == section and k not in DEPRECATED_KEYS]
        hint = f"the keys of {section} are: {', '.join(names)}"
    else:
        tops = sorted({k.split(".")[0] for k in known})
        hint = f"the top-level keys are: {', '.join(tops)}"
    return f"unknown config key {key!r}{how}; {hint}"
