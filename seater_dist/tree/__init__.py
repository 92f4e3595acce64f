"""The balanced k-ary item tree (SEATER_SPEC §1): ItemTree and its builders."""

from seater_dist.tree.item_tree import ItemTree, TreeError, depth_for

__all__ = ["ItemTree", "TreeError", "depth_for"]
