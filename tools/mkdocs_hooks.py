"""MkDocs hooks for the site (mkdocs.yml `hooks:`): links from a page to the repository's own files.

A page may link to a file outside docs/ by its relative path (``[records](../results/README.md)``,
``[probe](../benchmarks/overhead_probe.py)``, images too), which is right when the Markdown is read in the
repository. MkDocs cannot resolve such a link and, under --strict, fails on it. This hook checks that
each such target exists in the repository (a missing one is a warning, so --strict fails on it, as on
any broken link) and rewrites it as a link from the built page to the file in the checkout: the site
is built into site/ at the repository root, so ``site/<page>/index.html`` reaches the file at
``../../<path>``. With ``repo_url`` set in mkdocs.yml it links to ``<repo_url>/blob/main/<path>`` instead.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re

log = logging.getLogger("mkdocs.plugins.dps_fast")

_LINK = re.compile(r"(!?\[[^\]\n]*\])\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_SCHEME = "dps-repo:"


def _repo_link(page, target: str, docs_dir: str, root: str) -> str | None:
    """The repository path of a relative link that leaves docs/, or None for any other link."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
        return None
    path, _, _anchor = target.partition("#")
    src_dir = posixpath.dirname(page.file.src_uri)
    full = os.path.normpath(os.path.join(docs_dir, src_dir, path))
    if full == docs_dir or full.startswith(docs_dir + os.sep):
        return None  # a page of the site: MkDocs checks it
    rel = os.path.relpath(full, root)
    if rel.startswith(".."):
        log.warning("%s: link %r leaves the repository", page.file.src_uri, target)
        return None
    if not os.path.exists(full):
        log.warning("%s: link %r: no such file in the repository (%s)", page.file.src_uri, target, rel)
    return rel.replace(os.sep, "/")


def on_page_markdown(markdown, page, config, files):
    """Marks links that leave docs/ (outside code blocks) with a private scheme, after checking them."""
    docs_dir = os.path.abspath(config["docs_dir"])
    root = os.path.dirname(os.path.abspath(config["config_file_path"]))

    def sub(match):
        rel = _repo_link(page, match[2], docs_dir, root)
        if rel is None:
            return match[0]
        anchor = match[2].partition("#")[2]
        return f"{match[1]}({_SCHEME}{rel}{'#' + anchor if anchor else ''})"

    out, last = [], 0
    for fence in _FENCE.finditer(markdown):  # leave code blocks alone
        out.append(_LINK.sub(sub, markdown[last:fence.start()]))
        out.append(fence[0])
        last = fence.end()
    out.append(_LINK.sub(sub, markdown[last:]))
    return "".join(out)


def on_page_content(html, page, config, files):
    """Points the marked links at the file: in the checkout beside site/, or at repo_url."""
    repo_url = (config.get("repo_url") or "").rstrip("/")
    if repo_url:
        prefix = f"{repo_url}/blob/main/"
    else:
        depth = page.url.count("/") if config["use_directory_urls"] else page.file.dest_uri.count("/")
        prefix = "../" * (depth + 1)
    return html.replace(f'href="{_SCHEME}', f'href="{prefix}').replace(f'src="{_SCHEME}', f'src="{prefix}')
