"""Write the installed versions of this environment as a constraints file and print what moved.

Usage: python .ci/constraints.py OLD NEW. OLD is the committed constraints.txt; NEW gets OLD's header
comments and one `name==version` line for every distribution installed here but the project itself
(local version labels such as `+cpu` are dropped, so the file installs on any platform).
"""

import importlib.metadata
import re
import sys


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: str) -> tuple[list[str], dict[str, str]]:
    header, pins = [], {}
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line.startswith("#"):
                header.append(line)
            elif "==" in line:
                name, version = line.split("==", 1)
                pins[canonical(name)] = version
    return header, pins


def main(old_path: str, new_path: str) -> None:
    header, old = read(old_path)
    installed = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if canonical(name) != "trl-resets":
            installed[name] = dist.version.split("+", 1)[0]
    new = {canonical(name): version for name, version in installed.items()}
    moved = [f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}"
             for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    print(f"{len(moved)} of {len(new)} distributions differ from {old_path}:" if moved
          else f"the newest releases are the ones in {old_path}")
    print("\n".join(moved))
    with open(new_path, "w") as handle:
        handle.write("\n".join(header) + "\n")
        handle.writelines(f"{name}=={installed[name]}\n" for name in sorted(installed, key=canonical))


if __name__ == "__main__":
    main(*sys.argv[1:])
