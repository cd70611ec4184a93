"""First-party pyserve plugins, one package per architecture family."""
