"""Print pinned requirements from pyproject.toml, one per line (used by the Dockerfile).

The Dockerfile installs dependencies in their own layers before it copies the source,
so a code change does not reinstall torch; reading the pins from pyproject.toml keeps
that file the single place where versions are pinned.

    python deploy/requirements_from_pyproject.py --only torch torchvision torchaudio
    python deploy/requirements_from_pyproject.py            # every runtime dependency
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# PEP 508: the distribution name is the leading run of letters, digits, '.', '_', '-'.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, only: set[str] | None = None) -> list[str]:
    """Return ``[project].dependencies``, optionally only those named in ``only``."""
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    if only is None:
        return list(deps)
    wanted = {_normalize(n) for n in only}
    out = []
    for dep in deps:
        match = _NAME.match(dep)
        if match and _normalize(match.group(1)) in wanted:
            out.append(dep)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="keep only these packages")
    args = parser.parse_args(argv)
    reqs = requirements(args.pyproject, set(args.only) if args.only else None)
    if args.only and len(reqs) != len(set(args.only)):
        # A renamed or dropped pin must break the image build, not silently skip a step.
        print(f"expected pins for {sorted(args.only)}, found {reqs}", file=sys.stderr)
        return 1
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
