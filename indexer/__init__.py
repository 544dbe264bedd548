"""lookalike's indexer: turn image folders into a searchable database of CNN descriptors.

    from indexer import Indexer
    summary = Indexer("photos.db").index(["~/Pictures"])
    print(summary.line())
"""
from .backbone import BackboneError
from .check import Report, check
from .cluster import ClusterError
from .decode import DecodeError
from .recipe import Recipe, RecipeMismatch
from .scan import RootNotFound
from .store import StoreError
from .sync import Indexer, Summary

__all__ = ["Indexer", "Summary", "check", "Report", "Recipe", "RecipeMismatch", "DecodeError", "BackboneError",
           "RootNotFound", "StoreError", "ClusterError"]
