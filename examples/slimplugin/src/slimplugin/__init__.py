"""An autoslim plugin: one compression method in its own package, found through its entry point."""
