"""The docs say what the code does: the parts that can be checked without a worker (the quickstart as a whole runs
in tests/integration/test_quickstart.py; the site builds with ``make docs``)."""

from pathlib import Path

import safetynet
from tests.fixtures.quickstart import Block, blocks

ROOT = Path(__file__).resolve().parents[1]


def test_the_quickstart_markers_are_all_understood():
    found = blocks()
    assert {block.action for block in found} == {"write", "add", "run", "worker", "output"}
    assert [block.target for block in found if block.action == "write"][:2] == ["proj/celery.py", "proj/__init__.py"]


def test_the_quickstart_migrate_output_lists_every_migration():
    (migrate,) = [block for block in blocks() if block.target == "manage.py migrate safetynet"]
    shown = [line.strip().removeprefix("Applying safetynet.").removesuffix("... OK")
             for line in migrate.output if line.strip().startswith("Applying")]
    migrations = sorted(path.stem for path in (Path(safetynet.__file__).parent / "migrations").glob("0*.py"))
    assert shown == migrations


def test_an_added_list_extends_the_one_the_file_has():
    block = Block("add", "proj/settings.py", 'INSTALLED_APPS = [\n    # ...\n    "safetynet",\n]\nX = [1]')
    assert block.as_addition() == 'INSTALLED_APPS += [\n    # ...\n    "safetynet",\n]\nX = [1]'


def test_every_page_is_in_the_site_and_the_readme():
    nav = (ROOT / "mkdocs.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f" {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"README.md's docs list has no link to docs/{page.name}"
