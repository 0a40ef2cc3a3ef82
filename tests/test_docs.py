"""docs/routers.md is generated from the registry and must match it."""

from pathlib import Path

from moebench.routers.docgen import render
from moebench.routers.registry import ROUTERS

DOC = Path(__file__).resolve().parent.parent / "docs" / "routers.md"


def test_routers_doc_is_fresh():
    assert DOC.read_text() == render(), "regenerate: python -m moebench.routers.docgen > docs/routers.md"


def test_every_builtin_router_has_notes_and_a_paper():
    from moebench.routers.docgen import NOTES

    builtin = [n for n, c in ROUTERS.classes().items() if c.__module__.startswith("moebench.routers.")]
    assert set(builtin) <= set(NOTES)
    assert all(ROUTERS.get(n).paper for n in builtin)
