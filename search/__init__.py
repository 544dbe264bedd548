"""lookalike's query side: which indexed images look like this one?

    from search import Searcher
    with Searcher("photos.db") as s:
        for m in s.search("query.jpg", k=10):
            print(m.path, m.score)
"""
from .searcher import Match, Searcher

__all__ = ["Match", "Searcher"]
