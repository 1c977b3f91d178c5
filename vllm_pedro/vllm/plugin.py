def register():
    """Filled in by the plugin work."""
