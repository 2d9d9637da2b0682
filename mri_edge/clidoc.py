"""docs/cli.md, generated from the commands' own --help (so the reference cannot drift).

    python -m mri_edge.clidoc > docs/cli.md
"""

from __future__ import annotations

import click

WIDTH = 100  # fixed, so the page does not depend on the terminal it was made in


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name in sorted(group.commands):
        cmd = group.commands[name]
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def reference() -> str:
    from .cli import main  # noqa: PLC0415

    parts = ["# Command-line reference", "",
             "Generated from each command's `--help` by `python -m mri_edge.clidoc > docs/cli.md`; a test "
             "checks that this page matches the code.", ""]
    # make_context applies each command's context settings (-h as well as --help), as a real run does
    opts = {"resilient_parsing": True, "terminal_width": WIDTH, "max_content_width": WIDTH}
    with main.make_context("mri-edge", [], **opts) as root:
        parts += ["## mri-edge", "", "```text", main.get_help(root).rstrip(), "```", ""]
        for path, cmd in _commands(main):
            name = " ".join(("mri-edge", *path))
            # the usage line is the parent's name followed by this info name
            with cmd.make_context(" ".join(path), [], parent=root, **opts) as ctx:
                parts += [f"## {name}", "", "```text", cmd.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(reference(), end="")
