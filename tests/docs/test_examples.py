"""Every `sh` and `console` example of README.md and docs/*.md runs as written (runner.py):
one test per block, named page:line; a block marked `<!-- not run: why -->` is a skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.docs.runner import PAGES, Block, PageRun, blocks, run_block

EXAMPLES = [block for page in PAGES for block in blocks(page)
            if block.runs or block.not_run is not None]


class Pages:
    """The page being run: one directory and daemon at a time, closed when the next begins."""

    def __init__(self) -> None:
        self.current: PageRun | None = None

    def run_for(self, block: Block) -> PageRun:
        if self.current is None or self.current.page != block.page:
            self.close()
            self.current = PageRun(block.page)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="module")
def pages() -> Iterator[Pages]:
    running = Pages()
    yield running
    running.close()


@pytest.mark.parametrize("block", EXAMPLES, ids=[block.id for block in EXAMPLES])
def test_example(block: Block, pages: Pages) -> None:
    if block.not_run is not None:
        pytest.skip(f"not run: {block.not_run}")
    run_block(pages.run_for(block), block)


def test_the_readme_has_examples_that_run() -> None:
    readme = [block for block in EXAMPLES if block.page.name == "README.md"]
    assert sum(block.runs for block in readme) >= 3
