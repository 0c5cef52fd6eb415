"""clipseg: the library under the commands (see README, "Layout")."""
