"""Flower side: the ClientApp, the ServerApp and the strategies by name."""
