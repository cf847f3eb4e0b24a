"""MkDocs hooks for the docs site (see mkdocs.yml).

The pages in docs/ are read on GitHub too, where a link may point out of docs/ to a file of the repository
(``../bench/README.md``). The site has no such page: the link becomes the file's path as code, and a link to a
file that does not exist fails the build, like any broken link.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

_OUTSIDE = re.compile(r"\[([^\]]+)\]\((\.\./[^)#\s]+)(#[^)]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Links out of docs/ to repository files: kept as the path, checked to exist."""
    docs_dir = Path(config["docs_dir"]).resolve()
    here = (docs_dir / page.file.src_path).parent

    def replace(match: re.Match[str]) -> str:
        text, target = match[1], match[2]
        path = (here / target).resolve()
        if docs_dir in path.parents:
            return match[0]  # inside docs/: MkDocs checks it
        if not path.exists():
            raise PluginError(f"{page.file.src_path}: the link {target!r} points to a file that does not exist")
        shown = path.relative_to(docs_dir.parent).as_posix()
        return f"`{shown}`" if text.strip("`") == shown else f"{text} (`{shown}` in the repository)"

    return _OUTSIDE.sub(replace, markdown)
