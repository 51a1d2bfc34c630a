"""Print constraints.txt: the exact version installed in this environment of every package that
cifar-exp and all its extras (what `make install` installs) need, directly or through other
packages (the installed requirements' closure; `pip freeze` would also list whatever else the
environment holds)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions that `make install` and CI install (pip install -c constraints.txt ...), so
# every machine gets the tested set (torch 2.14.1 among them) while pyproject.toml keeps the
# ranges a library needs. Written by `make constraints` from the environment it installed;
# to move a pin, edit it here (or delete its line), then run `make install constraints`.
"""


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """Name -> installed version of every distribution `root[extras]` needs."""
    versions: dict[str, str] = {}
    pending = [(root, frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, wanted = pending.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # a requirement this platform's markers leave out
            continue
        versions[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            markers = [{"extra": extra} for extra in wanted or {""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in markers):
                pending.append((req.name, frozenset(req.extras)))
    return versions


if __name__ == "__main__":
    pins = closure("cifar-exp", set(distribution("cifar-exp").metadata.get_all("Provides-Extra")))
    del pins["cifar-exp"]
    print(HEADER, end="")
    for name, version in sorted(pins.items()):
        print(f"{name}=={version}")
