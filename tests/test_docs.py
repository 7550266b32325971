"""The documentation's own checks: every public name has a docstring (tools/check_docstrings.py, which
`make docs` also runs), the checker finds what is missing, the site's hook checks and rewrites links that
leave docs/, and the README's relative links resolve. The site build itself is `make docs` (in `make test`)."""
import os
import re
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import check_docstrings  # noqa: E402
import mkdocs_hooks  # noqa: E402


def test_every_public_name_has_a_docstring():
    assert check_docstrings.missing() == []


def test_the_check_finds_missing_docstrings(monkeypatch):
    import torch

    mod = types.ModuleType("dps_fast._fake_public")
    mod.__doc__ = "A module."

    def documented():
        """Yes."""

    def bare():
        pass

    class Thing(torch.nn.Module):
        """A class."""

        def forward(self, x):  # an override of torch's: documented there
            return x

        def read(self):
            return 1

        def _private(self):
            pass

        @property
        def size(self):
            return 2

        @staticmethod
        def make():
            """Made."""

    class Bare:
        pass

    for obj in (documented, bare, Thing, Bare):
        obj.__module__ = mod.__name__
        setattr(mod, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    assert check_docstrings.missing([mod.__name__]) == [
        "dps_fast._fake_public:bare", "dps_fast._fake_public:Thing.read", "dps_fast._fake_public:Thing.size",
        "dps_fast._fake_public:Bare"]
    mod.__all__ = ["documented", "Bare"]
    mod.__doc__ = ""
    assert check_docstrings.missing([mod.__name__]) == ["dps_fast._fake_public (module)", "dps_fast._fake_public:Bare"]


class _Page:
    def __init__(self, src_uri, url):
        self.file = types.SimpleNamespace(src_uri=src_uri, dest_uri=src_uri.replace(".md", "/index.html"))
        self.url = url


def test_hook_checks_and_rewrites_links_out_of_docs(caplog):
    config = {"docs_dir": os.path.join(REPO, "docs"), "config_file_path": os.path.join(REPO, "mkdocs.yml"),
              "use_directory_urls": True, "repo_url": None}
    page = _Page("api/core.md", "api/core/")
    md = ("[records](../../results/README.md#top) [a page](../loop.md) [web](https://example.org) "
          "![plot](../../results/label-issues-pr.png) [gone](../../results/nope.md)\n"
          "```\n[in code](../../results/README.md)\n```\n")
    out = mkdocs_hooks.on_page_markdown(md, page, config, None)
    assert "[records](dps-repo:results/README.md#top)" in out and "![plot](dps-repo:results/label-issues-pr.png)" in out
    assert "[a page](../loop.md)" in out and "[web](https://example.org)" in out
    assert "[in code](../../results/README.md)" in out  # code blocks untouched
    assert any("no such file" in r.getMessage() and "results/nope.md" in r.getMessage() for r in caplog.records)
    html = mkdocs_hooks.on_page_content('<a href="dps-repo:results/README.md">', page, config, None)
    assert html == '<a href="../../../results/README.md">'  # site/api/core/index.html -> the checkout
    config["repo_url"] = "https://example.org/dps_fast/"
    html = mkdocs_hooks.on_page_content('<img src="dps-repo:results/x.png">', page, config, None)
    assert html == '<img src="https://example.org/dps_fast/blob/main/results/x.png">'


def test_readme_links_resolve():
    text = open(os.path.join(REPO, "README.md")).read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    links = [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:|^#", m)]
    assert links
    missing = [m for m in links if not os.path.exists(os.path.join(REPO, m.partition("#")[0]))]
    assert missing == []


def test_every_page_is_in_the_nav():
    nav = open(os.path.join(REPO, "mkdocs.yml")).read()
    pages = [os.path.relpath(os.path.join(d, f), os.path.join(REPO, "docs"))
             for d, _, files in os.walk(os.path.join(REPO, "docs")) for f in files if f.endswith(".md")]
    assert {"method.md", "contributing.md", "results.md", "index.md"} <= set(pages)
    assert [p for p in pages if f" {p}\n" not in nav] == []
